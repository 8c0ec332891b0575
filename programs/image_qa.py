"""Image question answering: one image, one question, one answer."""
from _cli import backend_from_args, epd, scene_image


@epd.function
def image_qa(s, image, question):
    s += epd.user(epd.image(image) + question)
    s += epd.assistant(epd.gen("answer", max_tokens=24))


def main(backend: epd.Backend) -> dict:
    picture = scene_image(("green", "triangle"), ("yellow", "circle"), background="black")
    state = image_qa.run(image=picture, question="What color is the circle?", backend=backend)
    return {"answer": state["answer"], "meta": state.get_meta_info("answer")}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
