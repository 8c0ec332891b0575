"""Fork/join: one image, several questions answered in parallel from one shared prefix, then a follow-up."""
from _cli import backend_from_args, epd, scene_image

QUESTIONS = ["How many shapes are there?", "What shape is red?", "Is there a square?"]


@epd.function
def ask_all(s, image):
    s += epd.user(epd.image(image) + "Describe the image.")
    s += epd.assistant(epd.gen("description", max_tokens=32))
    forks = s.fork(len(QUESTIONS))
    for f, question in zip(forks, QUESTIONS):
        f += epd.user(question)
        f += epd.assistant(epd.gen("answer", max_tokens=8))
    forks.join()
    s += epd.user("What color is the triangle?")
    s += epd.assistant(epd.select("triangle", choices=["red", "green", "blue", "yellow"]))


def main(backend: epd.Backend) -> dict:
    picture = scene_image(("blue", "triangle"), ("red", "circle"), ("yellow", "square"))
    state = ask_all.run(image=picture, backend=backend)
    return {"description": state["description"], "answers": dict(zip(QUESTIONS, state["answer"])),
            "triangle": state["triangle"]}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
