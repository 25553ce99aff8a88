"""The library behind the study's commands: settings and the configurator, the training loop and its run
folders, model loading and the Hugging Face formats, downloads and data, decoding, the E2E metrics and slot
errors, plots, the tokenizer. `model.py` and `lora.py`, at the top of the repository, are what it builds on."""
