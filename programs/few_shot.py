"""Few-shot with image examples: labelled example images, then a query image."""
from _cli import backend_from_args, demo_image, epd

EXAMPLES = [("red", "warm"), ("blue", "cool"), ("orange", "warm")]


@epd.function
def few_shot(s, examples, query):
    s += epd.system("Classify the color temperature of each image as warm or cool.")
    for image, label in examples:
        s += epd.user(epd.image(image) + "Temperature?")
        s += epd.assistant(label)
    s += epd.user(epd.image(query) + "Temperature?")
    s += epd.assistant(epd.select("label", choices=["warm", "cool"]))


def main(backend: epd.Backend) -> dict:
    examples = [(demo_image(color), label) for color, label in EXAMPLES]
    queries = [demo_image(c) for c in ("teal", "crimson")]
    states = few_shot.run_batch([{"examples": examples, "query": q} for q in queries], backend=backend,
                                progress_bar=True)
    return {"labels": [s["label"] for s in states], "meta": [s.get_meta_info("label") for s in states]}


if __name__ == "__main__":
    with backend_from_args(__doc__) as backend:
        print(main(backend))
