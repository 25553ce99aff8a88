# The same LoRA recipe on OpenAI's GPT-2 medium (355M), for comparison with our own model.
# Online, the weights are downloaded once; offline, pass a folder holding config.json and
# model.safetensors: --init_from=/path/to/gpt2-medium
include("lora_e2e.py")

out_dir = "out/lora_e2e_gpt2m"
init_from = "gpt2-medium"
dtype = "bfloat16"  # on GPUs; use --dtype=float32 on a CPU without bf16 support
