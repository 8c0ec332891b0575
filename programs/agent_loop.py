"""Agent loop: render a synthetic "screenshot" each turn, let the model emit a tool call, apply it.

Every turn extends the same conversation, so each prompt reuses the KV of the turns before it
(sessions); the loop is data-dependent, so the plan ends at the first tool call and runs eagerly.
"""
import json

from _cli import backend_from_args, epd

TOOL_CALL = {
    "type": "object",
    "properties": {"tool": {"type": "string", "enum": ["click", "type", "scroll", "done"]},
                   "x": {"type": "integer", "minimum": 0, "maximum": 99},
                   "y": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["tool", "x", "y"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
MAX_TURNS = 3


def screenshot(turn: int, clicks: list):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 10, 100, 30), outline="black")
    draw.text((14, 14), f"step {turn}", fill="black")
    draw.rectangle((30, 60, 80, 85), fill="royalblue")
    for x, y in clicks:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="red")
    return img


@epd.function
def agent(s, goal):
    s += epd.system("You operate a GUI. Answer with one JSON tool call per turn.")
    clicks = []
    for turn in range(MAX_TURNS):
        s += epd.user(epd.image(screenshot(turn, clicks)) + (goal if turn == 0 else "Next action?"))
        s += epd.assistant(epd.gen(f"call{turn}", json_schema=TOOL_CALL, max_tokens=40))
        call = json.loads(s[f"call{turn}"])
        if call["tool"] == "done":
            break
        clicks.append((call["x"], call["y"]))


def main(backend: epd.Backend) -> dict:
    state = agent.run(goal="Press the blue button.", backend=backend)
    turns = sorted(k for k in state.variables if k.startswith("call"))
    return {"calls": [state[k] for k in turns],
            "cached_tokens": [state.get_meta_info(k)["cached_tokens"] for k in turns]}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
