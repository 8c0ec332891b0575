"""vLLM-CPU's engine alone on `engine_offline.py`'s workload: the peer's side of the engine-alone comparison.

Run it with the vLLM-CPU venv of ../shared/peers/vllm_cpu/setup.sh, from the project root, in the environment
`compare.sh` gives vLLM:

    HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        /tmp/vllm-cpu/bin/python benchmarks/peer_vllm_offline.py MODEL_DIR [SIZE=224] [PROMPTS=256] [CONCURRENCY=64]

The same synthetic images and questions as `benchmarks/engine_offline.py --concurrency C` (one image, a
16-token question, 32 output tokens, ignore_eos, greedy); `max_num_seqs=C` holds C in flight. `vllm.LLM` keeps
its own split (a front-end process that preprocesses, an engine-core process), with no HTTP and no client.
"""
from __future__ import annotations

import sys
import time

from offline_kit import synthetic_image, text_of_tokens


def main() -> None:
    from vllm import LLM, SamplingParams

    given = [int(a) for a in sys.argv[2:5]]
    side, n, c = given + [224, 256, 64][len(given):]
    model = sys.argv[1]
    llm = LLM(model=model, dtype="float32", max_model_len=4096, max_num_seqs=c,
              limit_mm_per_prompt={"image": 1, "video": 0})
    tok = llm.get_tokenizer()

    def request(i: int) -> dict:
        content = [{"type": "image"}, {"type": "text", "text": text_of_tokens(tok, 16, i)}]
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
        return {"prompt": prompt, "multi_modal_data": {"image": synthetic_image(1000 * side + i, (side, side))}}

    params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0)
    llm.generate([request(10_000 + i) for i in range(4)], params, use_tqdm=False)  # warm-up
    reqs = [request(i) for i in range(n)]
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"vllm engine alone: {side}^2, {n} prompts, max_num_seqs {c}: {n / elapsed:.2f} req/s, "
          f"{tokens} output tokens in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
