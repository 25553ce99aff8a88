# The original study at full size, for a GPU: GPT-2 of 6 layers, 12 heads, 768 dims, context 1024,
# pretrained from scratch on WikiText-103 (run 1: 5 epochs), then 5 more epochs from run 1's weights
# (run 2); the ten prompts; LoRA with the paper's E2E recipe on our model and on OpenAI's GPT-2
# medium; beam decoding of the 630 test MRs and the official metrics. What `python study.py` runs
# on a machine with a GPU. It downloads what it needs: WikiText-103 (a 190 MB zip), the E2E release
# and GPT-2 medium (from the Hugging Face Hub).
#   python study.py config/study.py
#   python study.py config/study.py --corpus='books/*.txt'          # local text instead of WikiText-103
#   python study.py config/study.py --wikitext_src=wikitext-103-raw-v1.zip --e2e_src=e2e-dataset.zip \
#       --gpt2m_overrides=--init_from=/models/gpt2-medium          # offline, from local copies
out_dir = "out/study"
wikitext = "103"  # downloaded (or wikitext_src); corpus='FILES' for text of your own
e2e_src = ""  # '' : the official release, downloaded

pretrain_config = "config/pretrain.py"
pretrain_overrides = ()  # dtype, compile: auto (bfloat16 autocast and torch.compile on a GPU)
continue_config = "config/pretrain_continue.py"
continue_overrides = ()

prompts = "prompts.txt"
sample_overrides = ()

lora_config = "config/lora_e2e.py"
lora_overrides = ()
gpt2m_config = "config/lora_e2e_gpt2m.py"
gpt2m = "auto"  # skipped, with the reason and its command, when the weights cannot be had
gpt2m_overrides = ()

eval_overrides = ()  # every test MR, the paper's decoding (beam 10, length penalty 0.8, no repeated 4-gram), checked
