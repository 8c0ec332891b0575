"""Offline, deterministic random-weight checkpoints in Hugging Face format: Qwen2-VL (the default) and
LLaVA-1.5 (`arch="llava"`: CLIP ViT tower, MLP projector, Llama LM).

The tests and the default demo use these: no model hub is needed at any point. The tokenizer is a
byte-level BPE trained on Python's own stdlib sources, so it is local and reproducible too.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = "v1"
STAMP_FILE = ".build-stamp"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
ARCHES = ("qwen2_vl", "llava")
BPE_VOCAB_SIZE = 8000
CORPUS_MAX_BYTES = 1_500_000
INITIALIZER_RANGE = 0.1

# Qwen2-VL's ChatML layout: a default system turn, images/videos as vision_start pad vision_end
# at their position in the content list.
CHAT_TEMPLATE = r"""{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- elif message['content'] is not none -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}
{{- part['text'] -}}
{%- elif part['type'] in ('image', 'image_url') -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] in ('video', 'video_url') -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""


# LLaVA-1.5's layout (images where they appear in the content, as `<image>` and a newline):
#   [system text\n]USER: <image>\nWhat is it? ASSISTANT: answer</s>USER: ... ASSISTANT:
LLAVA_CHAT_TEMPLATE = r"""{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{%- set begin, end = '', '\n' -%}
{%- elif message['role'] == 'assistant' -%}{%- set begin, end = 'ASSISTANT:', '</s>' -%}
{%- else -%}{%- set begin, end = 'USER: ', ' ' -%}{%- endif -%}
{{- begin -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- elif message['content'] is not none -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}
{{- part['text'] -}}
{%- elif part['type'] in ('image', 'image_url') -%}
{{- '<image>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- end -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'ASSISTANT:' -}}
{%- endif -%}"""


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim // 2
    vision_dim: int
    vision_layers: int
    vision_heads: int


SIZES = {
    "tiny": ModelSize(256, 4, 4, 2, 1024, (8, 12, 12), 256, 4, 4),
    "small": ModelSize(1024, 12, 16, 4, 2816, (8, 12, 12), 512, 12, 8),
}


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= CORPUS_MAX_BYTES:
            break
    return files


def _corpus() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in _corpus_files()]


@contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Train without rayon threads (reproducible, and polite on shared CPUs); restore the setting after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def build_tokenizer(arch: str = "qwen2_vl", corpus: list[str] | None = None, vocab_size: int = BPE_VOCAB_SIZE):
    """Train a byte-level BPE (on stdlib sources unless `corpus` is given) and wrap it as a fast tokenizer
    with the arch's specials (Qwen2-VL's ChatML ones, or LLaVA's `<s>`, `</s>`, `<image>`) and its chat
    template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _serial_tokenizers():
        bpe.train_from_iterator(corpus or _corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # Specials go after the BPE vocab in a fixed order, as in Qwen2-VL, so their ids are predictable.
    specials = LLAVA_SPECIAL_TOKENS if arch == "llava" else SPECIAL_TOKENS
    vocab = dict(state["vocab"])
    vocab.update({token: len(state["vocab"]) + i for i, token in enumerate(specials)})
    if arch == "llava":
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=4096)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
        return tokenizer
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", model_max_length=32768
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _padded_vocab(n: int, multiple: int = 128) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_config(size: str | ModelSize, tokenizer, initializer_range: float = INITIALIZER_RANGE):
    """A Qwen2VLConfig of the named (or given) size whose token ids match `tokenizer`."""
    from transformers import Qwen2VLConfig

    s = SIZES[size] if isinstance(size, str) else size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=_padded_vocab(len(tokenizer)),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=32768,
        initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(s.mrope_section)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=s.vision_layers,
        embed_dim=s.vision_dim,
        hidden_size=s.hidden,
        num_heads=s.vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=initializer_range,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def preprocessor_config(max_pixels: int = 1280 * 28 * 28) -> dict:
    """Qwen2-VL's image processor settings (loads as Qwen2VLImageProcessorPil without torchvision); larger
    images are resized down to at most `max_pixels`."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 56 * 56,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def build_llava_config(size: str, tokenizer):
    """A LlavaConfig (CLIP ViT at 224², 16² patches → 256 image tokens; Llama LM) matching `tokenizer`."""
    from transformers import LlavaConfig

    s = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    text = dict(
        model_type="llama", vocab_size=_padded_vocab(len(tokenizer)), hidden_size=s.hidden,
        intermediate_size=s.intermediate, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, max_position_embeddings=4096, initializer_range=INITIALIZER_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
    )
    vision = dict(
        model_type="clip_vision_model", hidden_size=s.vision_dim, intermediate_size=4 * s.vision_dim,
        num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads, image_size=224, patch_size=14,
        projection_dim=s.vision_dim, initializer_range=INITIALIZER_RANGE,
    )
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<image>"], projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=256,
        tie_word_embeddings=False, pad_token_id=ids["<pad>"],
    )


def clip_preprocessor_config() -> dict:
    """CLIP's image processor settings at 224² (loads as CLIPImageProcessorPil without torchvision)."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_model(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, arch: str = "qwen2_vl") -> Path:
    """Write a random-weight checkpoint (config, fp32 safetensors, tokenizer, image processor).

    Deterministic: the same arch, size and seed give byte-identical files.
    """
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    if size not in SIZES or arch not in ARCHES:
        raise ValueError(f"unknown size {size!r} or arch {arch!r}; choose from {sorted(SIZES)} and {ARCHES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch)
    llava = arch == "llava"
    config = build_llava_config(size, tokenizer) if llava else build_config(size, tokenizer)
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if llava else Qwen2VLForConditionalGeneration
    model = cls(config).to(torch.float32).eval()
    text = config.text_config
    eos = [text.eos_token_id] if llava else [text.eos_token_id, text.pad_token_id]
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos,
                                               pad_token_id=text.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_json(out / "preprocessor_config.json", clip_preprocessor_config() if llava else preprocessor_config())
    return out


def cache_root() -> Path:
    return Path(os.environ.get("EPD_CACHE_DIR") or "~/.cache/epdlang").expanduser()


@functools.cache
def build_stamp() -> str:
    """What decides a checkpoint's bytes: this builder's source and the libraries that write the files."""
    from importlib.metadata import version

    parts = [Path(__file__).read_bytes()] + [version(p).encode() for p in ("torch", "transformers", "tokenizers")]
    parts.append(sysconfig.get_python_version().encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def ensure_tiny_model(size: str = "tiny", seed: int = 0, arch: str = "qwen2_vl") -> Path:
    """Return the cached checkpoint dir for (arch, size, seed), building it once. Safe if processes race.

    Invariant: a cached dir holds what this builder, with these library versions, writes now. Its
    `.build-stamp` names them; a dir left by another builder or version (a stale cache) is rebuilt in place.
    """
    name = f"{size}-seed{seed}-{FORMAT_VERSION}" if arch == "qwen2_vl" else f"{arch}-{size}-seed{seed}-{FORMAT_VERSION}"
    final, stamp = cache_root() / "models" / name, build_stamp()
    if _stamp_of(final) == stamp:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build_tiny_model(tmp, size=size, seed=seed, arch=arch)
        (tmp / STAMP_FILE).write_text(stamp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        _replace_dir(tmp, final, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _stamp_of(d: Path) -> str | None:
    try:
        return (d / STAMP_FILE).read_text()
    except OSError:
        return None


def _replace_dir(new: Path, final: Path, stamp: str) -> None:
    """Move `new` to `final`; a stale `final` is moved aside first. A racing process's fresh build wins."""
    try:
        os.rename(new, final)
        return
    except OSError:
        if _stamp_of(final) == stamp:
            return
    stale = Path(tempfile.mkdtemp(prefix=f".{final.name}-stale-", dir=final.parent))
    try:
        os.rename(final, stale / "old")
    except OSError:
        pass  # another process moved it first
    try:
        os.rename(new, final)
    except OSError:
        if _stamp_of(final) != stamp:
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# The random-weight embedded checkpoints (built and cached on first use): token parity, performance, planner.
TINY_ALIASES = {"tiny-random": "qwen2_vl", "tiny-llava": "llava"}
# The trained shapes model (runtime/shapes/train.py; docs/shapes_model.md), shipped in fp16: the default.
SHAPES_CHECKPOINT = Path(__file__).resolve().parent / "shapes" / "checkpoint"
SHAPES_ALIASES = ("tiny", "shapes")


def copy_trained_model(out_dir: str | os.PathLike) -> Path:
    """A copy of the shipped shapes checkpoint in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in SHAPES_CHECKPOINT.iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def resolve_model(name: str) -> str:
    """A model alias to its checkpoint directory (built and cached on first use); other names pass through."""
    if name in TINY_ALIASES:
        return str(ensure_tiny_model("tiny", arch=TINY_ALIASES[name]))
    if name in SHAPES_ALIASES:
        return str(SHAPES_CHECKPOINT)
    return name
