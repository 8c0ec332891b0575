"""JSON extraction under a schema: structured fields from an image."""
import json

from _cli import backend_from_args, demo_image, epd

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue", "other"]},
        "objects": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "objects"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # keeps a random tiny model from rambling in spaces
}


@epd.function
def extract(s, image):
    s += epd.user(epd.image(image) + "Extract the main color and the number of objects as JSON.")
    s += epd.assistant(epd.gen("record", json_schema=SCHEMA, max_tokens=48))


def main(backend: epd.Backend) -> dict:
    state = extract.run(image=demo_image("green"), backend=backend)
    return json.loads(state["record"])


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
