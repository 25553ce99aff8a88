"""OpenAI's GPT-2 weights: a local Hugging Face folder, or the Hub through huggingface_hub.

    gpt2_folder("gpt2-medium")          # config.json + model.safetensors from the Hub (or its cache)
    gpt2_folder("/models/gpt2-medium")  # a folder saved on another machine: used as it is

huggingface_hub (what transformers uses) does the Hub part, so its variables work here too:
HF_ENDPOINT (a Hub mirror, the usual way in where huggingface.co is blocked), HF_HUB_OFFLINE=1
(cache only, no network), HF_TOKEN, and HF_HOME / HF_HUB_CACHE (the cache shared with
transformers: a model it downloaded is found without a second download).
"""

from pathlib import Path

from model import UserError

HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_ORG = "openai-community"  # the Hub's home of OpenAI's GPT-2 since 2024; plain "gpt2" was its old id
HUB_FILES = ("config.json", "model.safetensors")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what hf_format.load_hf_model reads from a folder


def _checked_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise UserError(f"folder '{path}' has no config.json: not a Hugging Face model folder "
                        f"(it needs config.json and model.safetensors)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"folder '{path}' has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    return path


def _offline_hint(name: str, endpoint: str) -> str:
    return (f"on a machine with internet, save config.json and model.safetensors from {endpoint}/{HUB_ORG}/{name} "
            f"into a folder, copy it here and pass that folder instead of '{name}'; or set HF_ENDPOINT to a Hub mirror")


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())  # the library's messages may span lines
    return f"{type(error).__name__}: {text.split('. ')[0]}" if text else type(error).__name__


def _from_hub(name: str) -> Path:
    import httpx2
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(repo_id: str, local_only: bool = False) -> Path:
        config = Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only))
        # Pin the weights to the commit the config came from: both land in one snapshot folder even
        # if the repo changes between the two requests.
        for file in HUB_FILES[1:]:
            hf_hub_download(repo_id, file, revision=config.parent.name, local_files_only=local_only)
        return config.parent

    repo = f"{HUB_ORG}/{name}"
    hint = _offline_hint(name, constants.ENDPOINT)
    try:
        return fetch(repo)
    except LocalEntryNotFoundError as e:
        try:  # a cache filled before the repo moved holds it under its old id
            return fetch(name, local_only=True)
        except LocalEntryNotFoundError:
            pass
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                            f"HF_HUB_OFFLINE is set; {hint}") from None
        raise UserError(f"could not get {repo} from {constants.ENDPOINT} ({_first_sentence(e.__cause__ or e)}), and "
                        f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); {hint}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise UserError(f"{constants.ENDPOINT} answered HTTP {status} for {repo} "
                        f"(a wrong HF_ENDPOINT or HF_TOKEN?); {hint}") from None
    except (httpx2.HTTPError, OSError) as e:
        raise UserError(f"downloading {repo} from {constants.ENDPOINT} failed ({type(e).__name__}: {e}); "
                        f"{hint}") from None


def gpt2_folder(name_or_dir) -> Path:
    """A folder holding config.json and weights of a Hugging Face GPT-2: `name_or_dir` itself if it
    is a folder, else the Hub snapshot of one of HF_GPT2_NAMES (also as openai-community/NAME)."""
    path = Path(name_or_dir)
    if path.is_dir():
        return _checked_folder(path)
    name = str(name_or_dir).removeprefix(f"{HUB_ORG}/")
    if name not in HF_GPT2_NAMES:
        raise UserError(f"'{name_or_dir}' is neither a folder nor one of {', '.join(HF_GPT2_NAMES)}")
    return _checked_folder(_from_hub(name))
