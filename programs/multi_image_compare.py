"""Multi-image comparison: three images in one turn, then a follow-up that names one of them again."""
from _cli import backend_from_args, demo_image, epd


@epd.function
def compare(s, a, b, c):
    s += epd.system("You are a careful visual inspector.")
    s += epd.user(epd.image(a) + epd.image(b) + epd.image(c) + "What differs between these images?")
    s += epd.assistant(epd.gen("diff", max_tokens=24))
    s += epd.user("Look at this one again: " + epd.image(b) + "Is it the brightest?")
    s += epd.assistant(epd.select("brightest", choices=["yes", "no"]))


def main(backend: epd.Backend) -> dict:
    images = [demo_image(c) for c in ("navy", "gold", "gray")]
    print(compare.trace(*images).explain())
    state = compare.run(*images, backend=backend)
    return {"diff": state["diff"], "brightest": state["brightest"]}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
