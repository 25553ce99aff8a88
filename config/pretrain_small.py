# A CPU-sized GPT-2 that learns something real in about ten minutes on 2 cores, on WikiText-2
# (downloaded and prepared on first use: a 4.7 MB zip), or on text of your own:
#   python train.py config/pretrain_small.py
#   python data/text/prepare.py --src 'books/*.txt' --out_dir data/books && \
#       python train.py config/pretrain_small.py --data_dir=data/books
out_dir = "out/pretrain_small"
data_dir = "data/wikitext2"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0

max_iters = 300  # 1.2M tokens, about a quarter of an epoch
batch_size = 16
grad_accum = 1
lr = 2e-3
min_lr = 2e-4
warmup_iters = 30
decay = "cosine"
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 20
log_interval = 10
device = "cpu"
