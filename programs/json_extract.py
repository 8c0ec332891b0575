"""JSON extraction under a schema: the shapes in an image, left to right, as a JSON object."""
import json

from _cli import backend_from_args, epd, scene_image

SCHEMA = {
    "type": "object",
    "properties": {"shapes": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object",
        "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                       "color": {"enum": ["red", "green", "blue", "yellow"]}},
        "required": ["shape", "color"], "additionalProperties": False}}},
    "required": ["shapes"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # the compact form the model was trained to write
}


@epd.function
def extract(s, image):
    s += epd.user(epd.image(image) + "List the shapes as JSON.")
    s += epd.assistant(epd.gen("record", json_schema=SCHEMA, max_tokens=64))


def main(backend: epd.Backend) -> dict:
    state = extract.run(image=scene_image(("red", "square"), ("green", "circle")), backend=backend)
    return json.loads(state["record"])


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
