# A CPU-sized LoRA run on top of config/pretrain_small.py's model: the same recipe on a
# seeded random subset of the training pairs, so that it finishes in about 20 minutes on
# 2 cores. Part of the documented offline proof run (README).
include("lora_e2e.py")

out_dir = "out/lora_e2e_small"
init_from = "out/pretrain_small"
train_subset = 8000
epochs = 1
warmup_iters = 100
lr = 2e-3
eval_iters = 25
device = "cpu"
max_seq_len = 256  # the small model's context; E2E pairs are at most 127 tokens
