# Every step of config/study.py, sized for a CPU: 45 to 90 minutes on 2 cores. What `python study.py`
# runs on a machine without a GPU. It downloads what it needs: WikiText-2 (a 4.7 MB zip) and the E2E
# release (1.5 MB), both checked by sha256. The small GPT-2 (4 layers, 4 heads, 128 dims, context 256)
# pretrained on WikiText-2; run 2 a short continuation of run 1; LoRA on it with
# config/lora_e2e_small.py, one epoch of the 42,061 E2E training pairs; GPT-2 medium off (its LoRA
# run would take days on a CPU), listed with its command.
#   python study.py config/study_small.py
#   python study.py config/study_small.py --wikitext_src=wikitext-2-raw-v1.zip --e2e_src=e2e-dataset.zip  # offline
#   python study.py config/study_small.py --corpus='books/*.txt'      # text of your own instead of WikiText-2
# Its length is set by the three knobs marked below.
out_dir = "out/study_small"
wikitext = "2"  # prepared into data/wikitext2
e2e_src = ""  # '' : the official release, downloaded

pretrain_config = "config/pretrain_small.py"
pretrain_overrides = ("--max_iters=300",)  # knob: run 1's steps of 16 x 256 tokens
continue_config = "config/pretrain_small.py"
continue_overrides = ("--max_iters=100",)  # knob: run 2's steps (a fresh optimizer and schedule)

sample_overrides = ("--max_new_tokens=40", "--device=cpu")

lora_config = "config/lora_e2e_small.py"
lora_overrides = ("--epochs=1.0",)  # knob: passes over the training pairs
gpt2m = "off"  # days on a CPU; with a GPU or its time: --gpt2m=auto
gpt2m_overrides = ("--device=cpu", "--dtype=float32")

eval_overrides = ("--device=cpu",)
