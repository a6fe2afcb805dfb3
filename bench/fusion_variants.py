"""Selection ideas for fused prefill, measured against full prefill's own answers, task by task.

For every task, full prefill answers greedily (N tokens); then each strategy's fused cache is
teacher-forced on that answer. All N greedy choices agreeing is exactly "the fused greedy answer
is full prefill's answer, token for token" (a stricter test than `fuse eval`'s same first line),
at the cost of one forward pass instead of N decode steps. Also printed: the share of answer
tokens that agree, the mean log-probability of full's answer, and how much of the evidence (the
planted facts' tokens) the strategy recomputed.

Besides the registered strategies, two A^3 variants are defined here through the public
strategy registry (they are ideas under measurement, not part of kvlab):

    a3x:starts=K     the first K tokens of every chunk are recomputed too (EPIC's chunk starts),
                     inside the same budget
    a3x:sentences=1  whole sentences by their best pooled token score, until the budget is spent

    python bench/fusion_variants.py [--seed 1] [--n 20] [-N 24] a3@0.15 a3x:starts=8@0.15 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import ClassVar

import torch

import kvlab
from kvlab.decode import decode_n_tokens, eos_ids
from kvlab.fusion.chunking import SentenceEnds
from kvlab.fusion.evaluate import make_tasks
from kvlab.fusion.explain import evidence_texts, locate
from kvlab.fusion.fused import load_chunks, prefill
from kvlab.fusion.prompt import task_prompt
from kvlab.fusion.store.memory import MemoryStore
from kvlab.fusion.strategies import A3, make_strategy, register_strategy, top_rows
from kvlab.tasks.intervals import wilson_interval
from kvlab.tasks.scoring import score
from kvlab.tasks.suite import task_kind


@register_strategy("a3x")
class A3Variant(A3):
    """A^3 scores, plus chunk starts and/or whole sentences (`ends`: which document tokens end a sentence)."""

    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    starts: int = 0
    sentences: bool = False
    ends: tuple[bool, ...] = ()

    def select(self, inputs):
        scores = inputs.attention.float()
        if self.pool > 1:
            scores = torch.nn.functional.avg_pool1d(scores[None, None], self.pool, stride=1, padding=self.pool // 2,
                                                    count_include_pad=False)[0, 0]
        n, budget = inputs.n_docs, self.budget(inputs.n_docs)
        chosen = torch.zeros(n, dtype=torch.bool)
        for start, end in inputs.spans:
            chosen[start:min(end, start + self.starts)] = True
        left = budget - int(chosen.sum())
        if left > 0 and not self.sentences:
            chosen[top_rows(scores.masked_fill(chosen, -1.0), left)] = True
        elif left > 0:
            sentence = torch.tensor(self.ends[:n], dtype=torch.long).cumsum(0).roll(1)
            sentence[0] = 0
            best = torch.full((int(sentence.max()) + 1,), -1.0).scatter_reduce(0, sentence, scores, "amax")
            for s in torch.argsort(best, descending=True).tolist():
                rows = (sentence == s) & ~chosen
                count = int(rows.sum())
                if count > left:
                    chosen[top_rows(scores.masked_fill(~rows, -1.0), left)] = True
                    left = 0
                else:
                    chosen |= rows
                    left -= count
                if left <= 0:
                    break
        return torch.nonzero(chosen).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="+", help="strategy@rate, e.g. a3@0.15 a3x:starts=8@0.15")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="mixed")
    parser.add_argument("--seed", type=int, default=1, help="task seed (1: not the default suite's seed 0)")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("-N", "--new-tokens", type=int, default=24)
    args = parser.parse_args()

    loaded = kvlab.load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    tasks = make_tasks(loaded, args.task, args.n, seed=args.seed)
    sentence_ends = SentenceEnds(tokenizer)
    store = MemoryStore()
    strategies = {text: make_strategy(text.split("@")[0], float(text.split("@")[1]) if "@" in text else None)
                  for text in args.strategies}
    rows: dict[str, list[dict]] = {text: [] for text in strategies}
    full_right: list[bool] = []
    started = time.perf_counter()
    for index, task in enumerate(tasks):
        prompt = task_prompt(loaded, task)
        ends = tuple(sentence_ends([t for chunk in prompt.chunks for t in chunk]))
        texts = tokenizer.batch_decode([[t] for t in prompt.ids])
        evidence = sorted({p - prompt.n_prefix for text in evidence_texts(task)
                           for p in locate(texts, prompt, text).positions})
        load_chunks(loaded, store, prompt)
        with torch.no_grad():
            full = prefill(loaded, prompt, make_strategy("full"))
            answer = decode_n_tokens(model, full.cache, prompt.ids, args.new_tokens, eos=eos_ids(model),
                                     attention_mask=False, prefilled=full.logits[None]).ids
        text = tokenizer.decode(answer, skip_special_tokens=True)
        full_right.append(score(text, task.answers, verbatim=bool(task.meta.get("verbatim")))["substring"] == 1.0)
        marks = []
        for name, strategy in strategies.items():
            if isinstance(strategy, A3Variant):
                strategy = dataclasses.replace(strategy, ends=ends)
            with torch.no_grad():
                fused = prefill(loaded, prompt, strategy, store)
                logits = [fused.logits]
                if len(answer) > 1:
                    out = model(input_ids=torch.tensor([answer[:-1]]), past_key_values=fused.cache, use_cache=True)
                    logits.extend(out.logits[0].float())
                logits = torch.stack(logits)
            target = torch.tensor(answer)
            agree = (logits.argmax(-1) == target).float()
            picked = set(fused.selected.tolist())
            rows[name].append({
                "same": bool(agree.all()), "tokens": float(agree.mean()),
                "logprob": float(torch.log_softmax(logits, -1).gather(1, target[:, None]).mean()),
                "evidence": sum(p in picked for p in evidence) / len(evidence) if evidence else None,
            })
            marks.append(str(int(agree.all())))
        print(f"[{index}] {task_kind(task):8} full {'right' if full_right[-1] else 'wrong'}  same: {' '.join(marks)}",
              flush=True)
    right = [i for i, ok in enumerate(full_right) if ok]
    print(f"\n{args.model}, {args.task} seed {args.seed}: {len(tasks)} tasks, full prefill right on {len(right)} "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"{'strategy':28} {'same | full right':>24} {'same (all)':>11} {'tokens':>7} {'logprob':>8} {'evidence':>9}")
    for name, got in rows.items():
        same_right = sum(got[i]["same"] for i in right)
        low, high = wilson_interval(same_right, len(right)) if right else (float("nan"), float("nan"))
        evidence = [g["evidence"] for g in got if g["evidence"] is not None]
        print(f"{name:28} {same_right:>5}/{len(right):<3} [{low:.2f}, {high:.2f}] {sum(g['same'] for g in got):>6}/"
              f"{len(got):<4} {statistics.fmean(g['tokens'] for g in got):7.3f} "
              f"{statistics.fmean(g['logprob'] for g in got):8.3f} "
              f"{statistics.fmean(evidence) if evidence else float('nan'):9.2f}")


if __name__ == "__main__":
    main()
