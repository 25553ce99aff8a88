# The study's second run: 5 more epochs on WikiText-103, starting from the first run's weights
# (a fresh optimizer and schedule). Run after config/pretrain.py has finished.
include("pretrain.py")

init_from = "out/pretrain"
out_dir = "out/pretrain_continue"
