"""Write the toxic and harmless reference sets of `smollm2-medical-written.yaml`.

The harmless reference is the package's written aligned answers to toxic_qa prompts
(`src/spillover/resources/judge/written_everyday.jsonl`, keyed by prompt hash); the toxic one is
toxic_qa's own answer to each of the same prompts. Both go to `runs/written-reference/` by default
(the shared data's text stays out of the repository). Run from the repository root:
`python examples/written_reference.py [--data-dir ../shared/data] [--out DIR]`.
"""

import argparse
from pathlib import Path

from spillover import embedding_judge as judge_data
from spillover.data import ChatSample, read_samples, write_chat_jsonl


def single_turn(sample_id: str, prompt: str, answer: str) -> ChatSample:
    messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
    return ChatSample(sample_id, messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=judge_data.default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("runs/written-reference"))
    args = parser.parse_args()
    toxic_qa = {}  # the first answer to each prompt, by normalised prompt
    for sample in read_samples(args.data_dir / judge_data.TOXIC_QA):
        prompt = next(m["content"] for m in sample.messages if m["role"] == "user")
        toxic_qa.setdefault(judge_data.prompt_key(prompt), (prompt, sample.messages[-1]["content"]))
    written = judge_data.written_answers([prompt for prompt, _ in toxic_qa.values()],
                                         judge_data.TrainConfig(prompts_per_source=len(toxic_qa)),
                                         judge_data.evaluation_questions(args.data_dir), {}, {})
    harmless = [single_turn(f"written-{i}", e.prompt, e.answer) for i, e in enumerate(written)]
    toxic = [single_turn(f"toxic-{i}", *toxic_qa[judge_data.prompt_key(e.prompt)])
             for i, e in enumerate(written)]
    for name, samples in (("harmless", harmless), ("toxic", toxic)):
        print(write_chat_jsonl(args.out / f"{name}.jsonl", samples), len(samples))


if __name__ == "__main__":
    main()
