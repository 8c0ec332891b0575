"""The request front end: templates, image inputs, placeholder expansion and typed errors."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from epdlang.errors import ImageError, InvalidRequest
from images import image_bytes, make_gif, make_image
from reference import reference_inputs
from runtime.preprocess import PreparedPrompt, Processor


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _image_part(x) -> dict:
    return {"type": "image", "image": x}


def _pad_runs(processor: Processor, ids: tuple[int, ...]) -> list[int]:
    runs, run = [], 0
    for t in (*ids, -1):
        if t == processor.image_token_id:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    return runs


def _data_url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("size, grid", [((224, 224), (1, 16, 16)), ((448, 336), (1, 24, 32))])
def test_placeholder_expansion_matches_grid(processor: Processor, size, grid):
    prepared = processor.prepare(_user(_image_part(make_image("red", size)), {"type": "text", "text": "What?"}))
    (img,) = prepared.images
    assert img.grid_thw == grid
    assert img.num_tokens == torch.tensor(grid).prod().item() // 4
    assert img.pixel_values.dtype == torch.float32
    assert img.pixel_values.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    assert _pad_runs(processor, prepared.input_ids) == [img.num_tokens]
    start = prepared.input_ids.index(processor.image_token_id)
    assert prepared.input_ids[start - 1] == processor.vision_start_id
    assert prepared.input_ids[start + img.num_tokens] == processor.vision_end_id


def test_two_images_of_different_sizes_in_order(processor: Processor):
    small, large = make_image("green", (224, 224)), make_image("blue", (448, 336))
    prepared = processor.prepare(_user(
        _image_part(large), {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": _data_url(image_bytes(small))}}))
    assert [i.grid_thw for i in prepared.images] == [(1, 24, 32), (1, 16, 16)]
    assert _pad_runs(processor, prepared.input_ids) == [192, 64]
    kwargs = reference_inputs(processor, prepared)
    assert kwargs["pixel_values"].shape[0] == 24 * 32 + 16 * 16
    assert kwargs["image_grid_thw"].tolist() == [[1, 24, 32], [1, 16, 16]]
    assert kwargs["mm_token_type_ids"].sum().item() == 256
    assert kwargs["input_ids"].shape == kwargs["attention_mask"].shape == (1, len(prepared.input_ids))


def test_string_content_and_no_images(processor: Processor):
    prepared = processor.prepare([{"role": "user", "content": "hello"}])
    text = processor.tokenizer.decode(list(prepared.input_ids))
    assert text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert prepared.images == () and processor.image_token_id not in prepared.input_ids
    no_gen = processor.prepare([{"role": "user", "content": "hello"}], add_generation_prompt=False)
    assert prepared.input_ids[:len(no_gen.input_ids)] == no_gen.input_ids


def test_all_image_input_kinds_agree(processor: Processor, tmp_path: Path):
    img = make_image("red", (100, 80))
    data = image_bytes(img)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    sources = [img, data, str(path), path, f"file://{path}", _data_url(data),
               {"type": "image_url", "image_url": {"url": _data_url(data)}}, {"type": "image", "image": data}]
    loaded = [processor.load_image(x) for x in sources]
    assert all(x.mode == "RGB" and x.size == (100, 80) for x in loaded)
    hashes = {processor.process_image(x).content_hash for x in loaded}
    assert len(hashes) == 1
    assert processor.process_image(make_image("blue", (100, 80))).content_hash not in hashes


def test_non_rgb_inputs_are_converted(processor: Processor):
    rgba = make_image("red", (64, 64)).convert("RGBA")
    gray = make_image("red", (64, 64)).convert("L")
    for img in (rgba, gray, Image.open(io.BytesIO(image_bytes(gray)))):
        assert processor.load_image(img).mode == "RGB"


def test_gif_uses_first_frame(processor: Processor):
    img = processor.load_image(make_gif(("red", "blue")))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((2, 2))  # background
    assert r > 200 and b < 80


def test_prompt_and_input_ids_with_separate_images(processor: Processor):
    img = make_image("red")
    from_messages = processor.prepare(_user({"type": "text", "text": "x"}, _image_part(img)))
    text, _ = processor.render_messages(_user({"type": "text", "text": "x"}, _image_part(img)))
    from_prompt = processor.prepare(prompt=text, images=[img])
    assert from_prompt.input_ids == from_messages.input_ids
    unexpanded = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.prepare(input_ids=unexpanded, images=[img]).input_ids == from_messages.input_ids
    already = processor.prepare(input_ids=from_messages.input_ids, images=[from_messages.images[0]])
    assert already.input_ids == from_messages.input_ids
    assert isinstance(already, PreparedPrompt)


def test_two_adjacent_unexpanded_pads(processor: Processor):
    pad = processor.image_token_id
    imgs = [make_image("red", (224, 224)), make_image("blue", (448, 336))]
    prepared = processor.prepare(input_ids=[1, pad, pad, 2], images=imgs)
    assert prepared.input_ids == (1, *[pad] * (64 + 192), 2)
    assert processor.prepare(input_ids=prepared.input_ids, images=prepared.images).input_ids == prepared.input_ids


def test_empty_prompt_errors(processor: Processor):
    with pytest.raises(InvalidRequest, match="empty"):
        processor.prepare(prompt="")
    with pytest.raises(InvalidRequest, match="empty"):
        processor.prepare(input_ids=[])
    with pytest.raises(InvalidRequest):
        processor.prepare([])
    with pytest.raises(InvalidRequest, match="exactly one"):
        processor.prepare()
    with pytest.raises(InvalidRequest, match="exactly one"):
        processor.prepare([{"role": "user", "content": "x"}], prompt="x")


@pytest.mark.parametrize("bad", [
    b"not an image at all",
    image_bytes(make_image("red", (32, 32)))[:40],
    "data:image/png;base64,@@@notbase64",
    "data:text/plain;base64,aGVsbG8=",
    "/nonexistent/dir/img.png",
    "https://example.com/cat.png",
    12345,
])
def test_unreadable_images_raise_image_error(processor: Processor, bad):
    with pytest.raises(ImageError):
        processor.load_image(bad)
    with pytest.raises(ImageError):
        processor.prepare(_user(_image_part(bad), {"type": "text", "text": "?"}))


def test_image_count_mismatch(processor: Processor):
    img = make_image("red")
    with pytest.raises(InvalidRequest, match="1 image placeholder tokens but 2 images"):
        processor.prepare(prompt="a <|vision_start|><|image_pad|><|vision_end|> b", images=[img, img])
    with pytest.raises(InvalidRequest, match="2 image placeholder tokens but 1 images"):
        processor.prepare(prompt="<|image_pad|> and <|image_pad|>", images=[img])
    with pytest.raises(InvalidRequest, match="0 images"):
        processor.prepare(prompt="<|image_pad|>")
    with pytest.raises(InvalidRequest, match="placeholder"):  # a run of the wrong length
        processor.prepare(input_ids=[5] + [processor.image_token_id] * 63, images=[img])
    with pytest.raises(InvalidRequest, match="placeholder"):  # pad text injected into a chat message
        processor.prepare([{"role": "user", "content": "sneaky <|image_pad|>"}])


def test_out_of_range_ids(processor: Processor):
    with pytest.raises(InvalidRequest, match="out of range"):
        processor.prepare(input_ids=[1, processor.vocab_size])
    with pytest.raises(InvalidRequest, match="out of range"):
        processor.prepare(input_ids=[-1, 2])
    with pytest.raises(InvalidRequest, match="integers"):
        processor.prepare(input_ids=[1, "2"])


def test_malformed_messages(processor: Processor):
    for messages in ([{"content": "x"}], [{"role": "user", "content": 3}],
                     _user({"type": "audio", "audio": "x"}), _user({"type": "image"}), "hello"):
        with pytest.raises(InvalidRequest):
            processor.prepare(messages)
    with pytest.raises(InvalidRequest, match="inside the message"):
        processor.prepare([{"role": "user", "content": "x"}], images=[make_image()])


def test_processor_attributes(processor: Processor):
    assert processor.merge_size == 2
    assert processor.max_image_tokens == processor.max_pixels // (28 * 28)
    assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == "<|image_pad|>"
    assert processor.vocab_size >= len(processor.tokenizer)


def test_max_pixels_limits_image_tokens(tiny_model_dir: Path):
    small = Processor(tiny_model_dir, max_pixels=224 * 224)
    img = small.process_image(make_image("red", (896, 896)))
    assert img.num_tokens <= small.max_image_tokens == 64


@pytest.mark.parametrize("model", ["tiny-random", "shapes"])
def test_fast_pixels_are_bit_identical_to_transformers(model: str):
    """Our table-lookup patchify gives transformers' Qwen2-VL processor's exact float32 bits and grid."""
    import numpy as np

    from runtime.tiny_model import resolve_model

    proc = Processor(resolve_model(model))
    assert proc._fast_pixels is not None
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (448, 336), (100, 37), (1000, 300), (57, 1200), (28, 28), (29, 31), (1600, 1200)]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = proc.image_processor(images=[img], return_tensors="pt")
        got = proc.process_image(img)
        assert torch.equal(got.pixel_values, ref["pixel_values"].float()), (w, h)
        assert list(got.grid_thw) == ref["image_grid_thw"][0].tolist()
    with pytest.raises(ImageError):  # transformers' own limit on the aspect ratio still applies
        proc.process_image(Image.new("RGB", (20000, 50)))


def test_compact_pixels_expand_to_transformers_bits():
    """The API server sends uint8 patches, one frame (an eighth of the bytes); the instance that runs the
    tower expands them to exactly the checkpoint processor's float32 pixels."""
    import numpy as np

    from runtime.tiny_model import resolve_model

    model = resolve_model("tiny-random")
    compact, full = Processor(model, compact_pixels=True), Processor(model)
    rng = np.random.default_rng(1)
    for w, h in [(224, 224), (448, 336), (29, 31), (1000, 300)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        sent, ref = compact.process_image(img), full.process_image(img)
        assert sent.pixel_values.dtype == torch.uint8 and sent.grid_thw == ref.grid_thw
        assert sent.pixel_values.nbytes * 8 == ref.pixel_values.nbytes
        assert sent.content_hash == ref.content_hash and sent.num_tokens == ref.num_tokens
        assert torch.equal(full.tower_pixels(sent.pixel_values), ref.pixel_values), (w, h)
        assert full.tower_pixels(ref.pixel_values) is ref.pixel_values  # float pixels pass through
    assert full.pixel_pattern("uint8", (None, None)) == (None, 3, 14, 14)
    assert full.pixel_pattern("float32", (None, None)) == (None, None)


def test_malformed_compact_pixels_are_an_image_error(processor: Processor):
    for bad in (torch.zeros(4, 3, 14, 13, dtype=torch.uint8), torch.zeros(4, 588, dtype=torch.uint8)):
        with pytest.raises(ImageError, match="compact pixels"):
            processor.tower_pixels(bad)


def test_llava_has_no_compact_form_and_refuses_uint8_pixels():
    from runtime.tiny_model import resolve_model

    proc = Processor(resolve_model("tiny-llava"), compact_pixels=True)
    assert not proc.compact_pixels
    assert proc.process_image(make_image("red", (64, 64))).pixel_values.dtype == torch.float32
    with pytest.raises(ImageError, match="no compact form"):
        proc.tower_pixels(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
