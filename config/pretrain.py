# The study's first run: GPT-2 (6 layers, 12 heads, 768 dims) from scratch on WikiText-103,
# 5 epochs at lr 3e-4. About 117M training tokens an epoch; one step is 8 x 4 x 1024 tokens.
# The data is downloaded and prepared on first use (or: python data/wikitext103/prepare.py --src PATH).
out_dir = "out/pretrain"
data_dir = "data/wikitext103"

n_layer = 6
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0

epochs = 5
batch_size = 8
grad_accum = 4  # x processes under torchrun: lower it there to keep the same global batch
lr = 3e-4
min_lr = 3e-5
warmup_iters = 1000
decay = "cosine"
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 1000
eval_iters = 100
# dtype and compile are left to 'auto': bfloat16 autocast and torch.compile on a GPU, float32 eager on a CPU.
# The seed's float32 run on a GPU is one flag away: --dtype=float32 --compile=False
