# A CPU-sized LoRA run on top of config/pretrain_small.py's model, one epoch (config/study_small.py
# runs it as it is).
#
# It departs from the LoRA paper's recipe where a small, briefly trained base needs it: with that
# base's token embeddings frozen, an adapter on q and v alone barely learns. So every linear layer
# and the tied embedding/head are adapted, at rank 16 (the base is 128 wide), with a higher
# learning rate and a shorter warmup (the comparison: bench/results/lora_e2e_small.md). It trains on
# every pair: the slot-checked subsets (train_refs) have not done better on this model yet (README).
include("lora_e2e.py")

out_dir = "out/lora_e2e_small"
init_from = "out/pretrain_small"
lora_r = 16
lora_targets = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "wte")
epochs = 1
warmup_iters = 100
lr = 2e-3
eval_interval = 500  # steps: a validation curve, not a point per epoch
eval_iters = 25  # 200 dev pairs per evaluation
max_seq_len = 256  # the small model's context; E2E pairs are at most 127 tokens
device = "cpu"
