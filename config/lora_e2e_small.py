# A CPU-sized LoRA run on top of config/pretrain_small.py's model: one epoch over the E2E
# training set in about 25 minutes on 2 cores. Part of the documented offline proof run (README).
#
# It departs from the LoRA paper's recipe where a 10-minute base needs it: that base's token
# embeddings saw 1.2M tokens, and with them frozen an adapter on q and v alone barely learns
# (validation loss 5.9 after 300 steps, against 3.1 with 'wte'). So the tied embedding/head
# is adapted too, at rank 8, with a higher learning rate and a shorter warmup.
include("lora_e2e.py")

out_dir = "out/lora_e2e_small"
init_from = "out/pretrain_small"
lora_r = 8
lora_targets = ("q", "v", "wte")
epochs = 1
warmup_iters = 100
lr = 2e-3
eval_iters = 25  # 200 dev pairs per evaluation
max_seq_len = 256  # the small model's context; E2E pairs are at most 127 tokens
device = "cpu"
