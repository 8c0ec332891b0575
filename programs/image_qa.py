"""Image question answering: one image, one question, one answer."""
from _cli import backend_from_args, demo_image, epd


@epd.function
def image_qa(s, image, question):
    s += epd.user(epd.image(image) + question)
    s += epd.assistant(epd.gen("answer", max_tokens=24))


def main(backend: epd.Backend) -> dict:
    state = image_qa.run(image=demo_image("red"), question="What is in this picture?", backend=backend)
    return {"answer": state["answer"], "meta": state.get_meta_info("answer")}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
