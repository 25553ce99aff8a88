# Every step of the study in a few minutes on a CPU: a first try. It downloads what it needs:
# WikiText-2 (a 4.7 MB zip) and the E2E release (1.5 MB), both checked by sha256, and keeps
# everything in out/study_tiny/. A model of 2 layers and 32 dims, a few dozen steps, LoRA on 64
# E2E pairs, 5 test MRs decoded to at most 16 tokens: the numbers it makes mean nothing. GPT-2
# medium is left out (listed with its command).
#   python study.py config/study_tiny.py
#   python study.py config/study_tiny.py --wikitext_src=wikitext-2-raw-v1.zip --e2e_src=e2e-dataset.zip  # offline
out_dir = "out/study_tiny"
wikitext = "2"
pretrain_data = "out/study_tiny/data/wikitext2"
e2e_data = "out/study_tiny/data/e2e"

# Run 2 starts from run 1's weights, so it has run 1's architecture: its settings say so too (resuming a
# run refuses a config whose architecture differs from the run's).
_tiny = ("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--eval_interval=10",
         "--eval_iters=2", "--log_interval=1", "--warmup_iters=5", "--progress=False")
pretrain_config = "config/pretrain_small.py"
pretrain_overrides = (*_tiny, "--max_iters=30")
continue_config = "config/pretrain_small.py"
continue_overrides = (*_tiny, "--max_iters=10")

sample_overrides = ("--max_new_tokens=8", "--device=cpu")

_lora = ("--train_subset=64", "--batch_size=8", "--max_seq_len=64", "--eval_interval=4", "--eval_iters=2",
         "--log_interval=1", "--warmup_iters=2", "--progress=False")
lora_config = "config/lora_e2e_small.py"
lora_overrides = _lora
gpt2m = "off"  # listed with its command; --gpt2m=auto runs it (a 1.5 GB download of GPT-2 medium)
gpt2m_overrides = (*_lora, "--device=cpu", "--dtype=float32")

eval_overrides = ("--max_mrs=5", "--max_new_tokens=16", "--device=cpu")
