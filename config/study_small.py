# The offline proof on a 2-core CPU, from the local data in ../shared: every step of config/study.py
# on a smaller model and shorter runs. The small GPT-2 (4 layers, 4 heads, 128 dims, context 256) on
# 22 MB of English text; run 2 a short continuation of run 1; LoRA on it with config/lora_e2e_small.py
# on all 42,061 E2E training pairs; GPT-2 medium off (no weights offline), listed with its command.
#   python study.py config/study_small.py
# Its length is set by the three knobs marked below.
out_dir = "out/study_small"
corpus = "../shared/data/corpus/*.txt"
pretrain_data = "data/corpus"  # where the README's data/text/prepare.py command puts it
e2e_src = "../shared/data/e2e/e2e-dataset.zip"

pretrain_config = "config/pretrain_small.py"
pretrain_overrides = ("--max_iters=300",)  # knob: run 1's steps of 16 x 256 tokens
continue_config = "config/pretrain_small.py"
continue_overrides = ("--max_iters=100",)  # knob: run 2's steps (a fresh optimizer and schedule)

sample_overrides = ("--max_new_tokens=40", "--device=cpu")

lora_config = "config/lora_e2e_small.py"
lora_overrides = ("--epochs=2.0",)  # knob: passes over the 42,061 training pairs
gpt2m = "off"  # no weights offline; a machine with them: --gpt2m=auto
gpt2m_overrides = ("--device=cpu", "--dtype=float32")

eval_overrides = ("--device=cpu",)
