"""Fork/join: one image, several descriptions written in parallel from one shared prefix."""
from _cli import backend_from_args, demo_image, epd

ASPECTS = ["colors", "shapes", "mood"]


@epd.function
def describe(s, image):
    s += epd.system("You describe images precisely.")
    s += epd.user(epd.image(image) + "Look at this image.")
    forks = s.fork(len(ASPECTS))
    for f, aspect in zip(forks, ASPECTS):
        f += epd.user(f"Describe its {aspect} in one sentence.")
        f += epd.assistant(epd.gen("description", max_tokens=16))
    forks.join()
    s += epd.user("Summarise: " + " / ".join(s["description"]))
    s += epd.assistant(epd.gen("summary", max_tokens=16))


def main(backend: epd.Backend) -> dict:
    state = describe.run(image=demo_image("purple"), backend=backend)
    return {"descriptions": dict(zip(ASPECTS, state["description"])), "summary": state["summary"]}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
