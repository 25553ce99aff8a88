# LoRA on E2E NLG, the LoRA paper's recipe (Hu et al., 2021, GPT-2 on E2E), applied to the
# study's own pretrained GPT-2 (the latest of out/pretrain_continue, out/pretrain).
out_dir = "out/lora_e2e"
init_from = "latest"  # the study's newest pretraining run; or a run folder, a model file, gpt2-medium

lora_r = 4
lora_alpha = 32.0
lora_dropout = 0.1
lora_targets = ("q", "v")

epochs = 5
batch_size = 8
grad_accum = 1
max_seq_len = 512
lr = 2e-4
min_lr = 0.0
decay = "linear"
warmup_iters = 500
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0  # the recipe does not clip
label_smoothing = 0.1

eval_interval = 0  # once per epoch
eval_iters = 0  # the whole dev set
log_interval = 50
