# A CPU-sized LoRA run on top of config/pretrain_small.py's model: one epoch over the E2E
# training set in about 12 minutes on 2 cores. Part of the offline proof, config/study_small.py
# (README), which runs two epochs.
#
# It departs from the LoRA paper's recipe where a 10-minute base needs it: that base's token
# embeddings saw 1.2M tokens, and with them frozen an adapter on q and v alone barely learns. So
# every linear layer and the tied embedding/head are adapted, at rank 16 (the base is 128 wide),
# with a higher learning rate and a shorter warmup. Measured on this base, 400 steps each: q, v and
# wte at rank 8 reach E2E validation loss 2.86; all targets at rank 16 reach 2.50.
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
