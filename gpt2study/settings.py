"""Every entry point's settings, in one place, so that any script can read another's config files.

Each class is made of the parts it shares with others, so that a setting is declared once and
keeps one name from config file to use: PretrainConfig is TrainConfig + GPTConfig, a fine-tuning
run is TrainConfig + LoRAConfig + the base's ModelOptions, and so on.
"""

from dataclasses import dataclass

from gpt2study.cli import DEVICE_HELP
from gpt2study.decoding import BEAM_RULES, METHODS
from gpt2study.e2e_data import DEFAULT_OUT as E2E_DATA
from gpt2study.training import TrainConfig
from gpt2study.wikitext import WIKITEXT2, WIKITEXT103
from lora import LoRAConfig
from model import GPTConfig, ModelOptions, UserError, setting


@dataclass
class ReleaseSource:
    """Where a data set's release comes from: a local copy, a URL of the user's own, or the mirrors."""

    src: str | None = setting(None, "the release zip or its unpacked folder (default: download)")
    url: str | None = setting(None, "download the zip from this URL only (a mirror of your own; several: "
                              "GPT2STUDY_MIRRORS)")

    def check(self):
        if self.src and self.url:
            raise UserError("give --src (a local copy) or --url (a mirror), not both")


@dataclass
class WikiTextConfig(ReleaseSource):
    out_dir: str = setting(str(WIKITEXT103.default_out), "output folder for the .bin files and meta.json (and the zip)")


@dataclass
class WikiText2Config(ReleaseSource):
    out_dir: str = setting(str(WIKITEXT2.default_out), "output folder for the .bin files and meta.json (and the zip)")


@dataclass
class E2EDataConfig(ReleaseSource):
    out_dir: str = setting(str(E2E_DATA), "output folder for the .jsonl files and meta.json (and the zip)")


@dataclass
class TextConfig:
    src: tuple[str, ...] = setting((), "files, folders (their *.txt) or globs; several: comma-separated")
    url: tuple[str, ...] = setting((), "text files to download first (into OUT_DIR/sources/); comma-separated")
    out_dir: str = setting("", "output folder for train.bin, val.bin and meta.json (required)")
    val_fraction: float = setting(0.01, "share of the text, in whole documents, for validation", above=0, below=1)
    seed: int = setting(0, "seed of the random choice of validation documents")
    doc_sep: str = setting("blank", "documents are separated by blank lines, or each file is one",
                           choices=("blank", "file"))

    def check(self):
        if not self.src and not self.url:
            raise UserError("give the text with --src FILES (or --url URL)")
        if not self.out_dir:
            raise UserError("give --out_dir: the folder for train.bin, val.bin and meta.json")


@dataclass
class PretrainConfig(TrainConfig, GPTConfig):
    out_dir: str = setting("out/pretrain", "the run's folder: checkpoint/, metrics.jsonl, tb/")
    init_from: str = setting("scratch", "'scratch' (a new model of the settings below), 'resume' (continue out_dir's "
                             "run exactly), or a model to start from (models.py: a run folder, a file, gpt2, ...)")
    data_dir: str = setting("data/wikitext103", "holds train.bin and val.bin from a data/*/prepare.py")


@dataclass
class FinetuneConfig(TrainConfig, LoRAConfig, ModelOptions):
    out_dir: str = setting("out/lora_e2e", "the run's folder: checkpoint/ (the adapter alone), metrics.jsonl, tb/")
    init_from: str = setting("latest", "the base: 'latest' (the study's newest pretraining run), a run folder, a "
                             "model file, a Hugging Face folder or hub name (gpt2-medium), or 'resume'")
    data_dir: str = setting(str(E2E_DATA), "from data/e2e/prepare.py")
    train_refs: str = setting("all", "'all' the training pairs as released; 'checked': only those whose reference "
                              "says exactly what its MR says (the slot checker, e2e_slots.py, finds no error); "
                              "'mr_of_ref': each MR made what its reference says (the slots it leaves out dropped), "
                              "pairs with a wrong, added or repeated slot left out", choices=("all", "checked",
                                                                                             "mr_of_ref"))
    train_subset: int = setting(0, "> 0: train on this many training pairs (a seeded random choice)", at_least=0)
    max_seq_len: int = setting(512, "longest prompt + reference, in tokens (longer pairs are cut)", at_least=2)


@dataclass
class SampleConfig:
    model: str = setting("latest", "what to sample from (models.py): 'latest', a run folder (LoRA runs too), a "
                         "model file, a Hugging Face folder or hub name")
    prompts: str = setting("prompts.txt", "a UTF-8 file, one prompt per line")
    max_new_tokens: int = setting(100, "tokens to add to each prompt", at_least=1)
    num_samples: int = setting(1, "continuations per prompt", at_least=1)
    temperature: float = setting(0.8, "sampling temperature; 0 is greedy", at_least=0.0)
    top_k: int | None = setting(200, "sample among the k likeliest tokens (None: all)", at_least=1)
    top_p: float | None = setting(None, "sample within the smallest set of probability ≥ p (None: off)", above=0.0,
                                  at_most=1.0)
    greedy: bool = setting(False, "always take the likeliest token")
    seed: int = setting(1337, "of the sampling", at_least=0)
    device: str = setting("auto", DEVICE_HELP)
    out: str = setting("", "file the samples are appended to (default: samples.txt beside the model)")


@dataclass
class DecodeConfig:
    method: str = setting("beam", "beam search or greedy decoding", choices=tuple(m for m in METHODS if m != "sample"))
    beam_size: int = setting(10, "beams per MR", at_least=1)
    length_penalty: float = setting(0.8, "a finished hypothesis scores sum_logprob / length ** length_penalty")
    no_repeat_ngram_size: int = setting(4, "no n-gram twice within an output; 0: off", at_least=0)
    max_new_tokens: int = setting(64, "longest output, in tokens", at_least=1)
    beam_rule: str = setting("transformers", "'transformers' (generate()'s rule) or 'paper' (the LoRA paper's "
                             "decoder); see decoding/beam.py", choices=BEAM_RULES)
    rerank_slots: bool = setting(True, "beam search: of the final beam, take the hypothesis with the fewest slot "
                                 "errors against its MR (ties: the better beam score) instead of the best scored")
    slot_penalty: float = setting(1.0, "beam search: a hypothesis loses this much of its score per slot error "
                                  "against its MR as it finishes, so the search goes on for one that says the MR "
                                  "(0: off)", at_least=0.0)
    widen_beam: int = setting(40, "beam search: an output still missing or mistaking one or two of its MR's slots is "
                              "searched again with this many beams, and replaced if that has fewer slot errors "
                              "(0, or not above beam_size: off)", at_least=0)
    batch_size: int | None = setting(None, "MRs decoded side by side (None: by device)", at_least=1)

    def decoding(self) -> dict:
        """The settings that decide the outputs, as scores.json records them."""
        keys = ("method",) if self.method == "greedy" else (
            "method", "beam_size", "length_penalty", "no_repeat_ngram_size", "beam_rule", "rerank_slots",
            "slot_penalty", "widen_beam")
        return {k: getattr(self, k) for k in (*keys, "max_new_tokens")}


@dataclass
class EvalConfig(DecodeConfig):
    configs: tuple = setting(("config/lora_e2e.py", "config/lora_e2e_gpt2m.py"),
                             "fine-tuning configs: each gives two rows, its base before and after LoRA")
    out_dir: str = setting("out/e2e_eval", "outputs, scores.md and scores.json")
    data_dir: str = setting(str(E2E_DATA), "from data/e2e/prepare.py")
    max_mrs: int = setting(0, "only the first N test MRs (a quick check; the table says so)", at_least=0)
    device: str = setting("auto", DEVICE_HELP)
    outputs: str = setting("", "score this file of system outputs (one line per test MR) instead")
    refs: str = setting("", "with outputs: testset_w_refs.csv, or the release zip")
    json: bool = setting(False, "with outputs: print one JSON object")

    def check(self):
        if self.refs and not self.outputs:
            raise UserError("refs goes with outputs: --outputs FILE --refs testset_w_refs.csv")


@dataclass
class ExportConfig:
    run: str = setting("", "what to export (models.py): a run folder, a model file, a Hugging Face folder, a LoRA "
                       "run or PEFT adapter folder", positional=True)
    out: str = setting("", "the folder to write; it must not exist yet, or be empty")
    merged: bool = setting(False, "a LoRA run: write its base with the adapter merged in, as one GPT-2 folder")

    def check(self):
        if not self.run:
            raise UserError("name what to export: python export.py RUN --out DIR")
        if not self.out:
            raise UserError("name the folder to write: python export.py RUN --out DIR")


@dataclass
class StudyConfig:
    out_dir: str = setting("out/study", "the study's folder: its runs, configs/, logs/, study.md, study.json, the PNGs")
    wikitext: str = setting("103", "pretrain on WikiText-103 (about 117M tokens) or on WikiText-2 (about 2.4M, "
                            "for a CPU); both are downloaded", choices=("103", "2"))
    wikitext_src: str = setting("", "that WikiText from a local copy (its release zip or folder); '' downloads it")
    wikitext_url: str = setting("", "download that WikiText's zip from this URL only (a mirror of your own)")
    corpus: str = setting("", "pretrain on local text instead (files, folders or globs, comma-separated; "
                          "data/text/prepare.py)")
    pretrain_data: str = setting("", "folder of the prepared pretraining tokens; '' is data/wikitext103 or "
                                 "data/wikitext2, or OUT_DIR/data/corpus with a corpus")
    e2e_src: str = setting("", "the E2E release from a local copy (its zip or folder); '' downloads it")
    e2e_url: str = setting("", "download the E2E zip from this URL only (a mirror of your own)")
    e2e_data: str = setting("data/e2e/prepared", "folder of the prepared E2E data")
    pretrain_config: str = setting("config/pretrain.py", "run 1, from scratch")
    pretrain_overrides: tuple[str, ...] = setting((), "'--key=value' settings of run 1, after its config file")
    continue_config: str = setting("config/pretrain_continue.py", "run 2, which starts from run 1's weights")
    continue_overrides: tuple[str, ...] = setting((), "'--key=value' settings of run 2")
    prompts: str = setting("prompts.txt", "the prompts run 2 continues, one a line")
    sample_overrides: tuple[str, ...] = setting((), "'--key=value' settings of sample.py")
    lora_config: str = setting("config/lora_e2e.py", "LoRA on our model (run 2)")
    lora_overrides: tuple[str, ...] = setting((), "'--key=value' settings of that LoRA run")
    gpt2m_config: str = setting("config/lora_e2e_gpt2m.py", "LoRA on OpenAI's GPT-2 medium")
    gpt2m_overrides: tuple[str, ...] = setting((), "'--key=value' settings of that LoRA run (--init_from=FOLDER: "
                                               "local weights)")
    gpt2m: str = setting("auto", "the GPT-2 medium run: 'auto' (skipped, with the reason, when its weights cannot be "
                         "had), 'on' (they must be), 'off'", choices=("auto", "on", "off"))
    eval_overrides: tuple[str, ...] = setting((), "'--key=value' settings of e2e_eval.py (--max_mrs, --device, ...)")
    echo: bool = setting(True, "show each step's output as it runs (it always goes to OUT_DIR/logs/STEP.log)")

    def check(self):
        if self.corpus and (self.wikitext_src or self.wikitext_url):
            raise UserError("give corpus (local text) or wikitext_src / wikitext_url (WikiText), not both")
        for what in ("wikitext", "e2e"):
            if getattr(self, f"{what}_src") and getattr(self, f"{what}_url"):
                raise UserError(f"give {what}_src (a local copy) or {what}_url (a mirror), not both")
        if self.gpt2m != "off" and not self.gpt2m_config:
            raise UserError("gpt2m_config is empty: name the GPT-2 medium LoRA config, or set --gpt2m=off")
