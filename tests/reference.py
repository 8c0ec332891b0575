"""Reference inputs for transformers' Qwen2VLForConditionalGeneration and LlavaForConditionalGeneration, to
compare our engine against them."""
from __future__ import annotations

import torch

from runtime.preprocess import PreparedPrompt, Processor


def reference_inputs(processor: Processor, prepared: PreparedPrompt) -> dict[str, torch.Tensor]:
    """kwargs for the model's `forward/generate` on one prepared prompt (batch of 1)."""
    input_ids = torch.tensor([prepared.input_ids], dtype=torch.long)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if prepared.images:
        kwargs["pixel_values"] = torch.cat([img.pixel_values for img in prepared.images])
        if processor.tokens_per_image:  # LLaVA: fixed-size images [N, 3, H, W], 1-D positions
            return kwargs
        kwargs["image_grid_thw"] = torch.tensor([img.grid_thw for img in prepared.images], dtype=torch.long)
        # transformers 5 needs the modality of each token to build M-RoPE positions (0 text, 1 image).
        kwargs["mm_token_type_ids"] = (input_ids == processor.image_token_id).int()
    return kwargs


@torch.inference_mode()
def reference_greedy(model, processor: Processor, prepared: PreparedPrompt, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (stops at the model's EOS ids, like the engine's default)."""
    kwargs = reference_inputs(processor, prepared)
    out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(processor.eos_token_ids))
    return out[0, kwargs["input_ids"].shape[1]:].tolist()
