"""Selection ideas for fused prefill, measured against full prefill's own answers, task by task.

For every task, full prefill answers greedily (N tokens); then each strategy's fused cache is
teacher-forced on that answer. All N greedy choices agreeing is exactly "the fused greedy answer
is full prefill's answer, token for token" (a stricter test than `fuse eval`'s same first line),
at the cost of one forward pass instead of N decode steps. Also printed: the share of answer
tokens that agree, the mean log-probability of full's answer, how much of the evidence (the
planted facts' tokens) the strategy recomputed, and the fused prefill's seconds (store reads
included).

Besides the registered strategies, these ideas are defined here through the public strategy
registry and attention routes (they are under measurement, not part of kvlab):

    a3x:starts=K     the first K tokens of every chunk are recomputed too (EPIC's chunk starts),
                     inside the same budget
    a3x:sentences=1  whole sentences by their best pooled token score, until the budget is spent
    a3x:per_chunk=1  the budget shared out over the chunks by their length, each chunk's best
                     scores within it (A^3's own choice gathers late in the prompt)
    a3x:whole=1      whole chunks, the most attended first (summed A^3 scores), while they fit in
                     the budget; the rest by score (no chunk mixes fresh and stored tokens but one)
    oracle           the evidence tokens (the planted facts, known only to a benchmark) first,
                     then A^3's best scores until the budget is spent; `oracle:pad=K` also takes
                     K neighbours on each side of every evidence token
    --ape T:S        APE's attention for the question and answer rows in the selective layers:
                     logits over the document keys divided by T, and the documents' share of
                     the attention rescaled as APE does (log-sum-exp times T*S); 1:1 is exact

    python bench/fusion_variants.py [--seed 1] [--n 20] [-N 24] [--ape 0.9:0.9,...] a3@0.15 oracle@0.15 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import ClassVar

import torch

import kvlab
from kvlab.caches.taps import attention_taps
from kvlab.decode import decode_n_tokens, eos_ids
from kvlab.fusion.chunking import SentenceEnds
from kvlab.fusion.evaluate import make_tasks
from kvlab.fusion.explain import evidence_texts, locate
from kvlab.fusion.fused import load_chunks, prefill
from kvlab.fusion.prompt import task_prompt
from kvlab.model_facts import decoder_layers
from kvlab.fusion.store.memory import MemoryStore
from kvlab.fusion.strategies import A3, make_strategy, register_strategy, top_per_chunk, top_rows
from kvlab.tasks.intervals import wilson_interval
from kvlab.tasks.scoring import score
from kvlab.tasks.suite import task_kind


@register_strategy("a3x")
class A3Variant(A3):
    """A^3 scores, plus chunk starts, whole sentences (`ends`: which document tokens end a sentence), or
    the budget shared out over the chunks by their length (`per_chunk`)."""

    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    starts: int = 0
    sentences: bool = False
    per_chunk: bool = False
    whole: bool = False
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
        if self.whole:
            mass = [float(inputs.attention[start:end].sum()) for start, end in inputs.spans]
            for c in sorted(range(len(mass)), key=lambda c: -mass[c]):
                start, end = inputs.spans[c]
                if end - start + int(chosen.sum()) <= budget:
                    chosen[start:end] = True
        left = budget - int(chosen.sum())
        if left > 0 and self.per_chunk:
            chosen[top_per_chunk(scores.masked_fill(chosen, -1.0), inputs.spans, left)] = True
        elif left > 0 and not self.sentences:
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


@register_strategy("oracle")
class EvidenceOracle(A3):
    """The evidence tokens first, then A^3's scores: does recomputing the right tokens suffice?"""

    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    pad: int = 0
    evidence: tuple[int, ...] = ()

    def select(self, inputs):
        n = inputs.n_docs
        chosen = torch.zeros(n, dtype=torch.bool)
        for p in self.evidence:
            chosen[max(0, p - self.pad):min(n, p + self.pad + 1)] = True
        left = self.budget(n) - int(chosen.sum())
        if left > 0:
            chosen[top_rows(inputs.attention.float().masked_fill(chosen, -1.0), left)] = True
        return torch.nonzero(chosen).flatten()


def ape_route(temperature: float, scale: float, docs: slice):
    """An attention route: rows that see past the documents (question, answer) attend as in APE.

    Per document key j: logit_j / T + (T*S - 1) * logsumexp over the visible document keys of
    logit / T; other keys keep their logits. That is APE's two-group softmax (documents at
    temperature T, their group log-sum-exp times T*S) written as one softmax.
    """
    def route(kernel, module, query, key, value, mask, **kwargs):
        out, weights = kernel(module, query, key, value, mask, **kwargs)
        n_rows, n_keys = query.shape[-2], key.shape[-2]
        if n_keys <= docs.stop:
            return out, weights
        if mask is None:  # causal, aligned to the last key
            visible = torch.arange(n_keys)[None, :] <= torch.arange(n_keys - n_rows, n_keys)[:, None]
        else:
            visible = (mask if mask.dtype == torch.bool else mask == 0)[0, 0, :, :n_keys].cpu()
        rows = torch.nonzero(visible[:, docs.stop]).flatten()
        if not rows.numel():
            return out, weights
        q, k, v = query[:, :, rows].float(), key.float(), value.float()
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scaling = kwargs.get("scaling") or q.shape[-1] ** -0.5
        logits = q @ k.transpose(-1, -2) * scaling
        is_doc = torch.zeros(n_keys, dtype=torch.bool)
        is_doc[docs] = True
        seen = visible[rows]
        doc_logits = (logits / temperature).masked_fill(~(seen & is_doc), float("-inf"))
        group = torch.logsumexp(doc_logits, -1, keepdim=True)
        adjusted = torch.where(is_doc, logits / temperature + (temperature * scale - 1) * group, logits)
        probs = torch.softmax(adjusted.masked_fill(~seen, float("-inf")), -1)
        out = out.clone()
        out[:, rows] = (probs @ v).transpose(1, 2).to(out.dtype)
        return out, weights

    return route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="+", help="strategy@rate, e.g. a3@0.15 a3x:starts=8@0.15")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="mixed")
    parser.add_argument("--seed", type=int, default=1, help="task seed (1: not the default suite's seed 0)")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("-N", "--new-tokens", type=int, default=24)
    parser.add_argument("--ape", default=None,
                        help="also each strategy with APE's attention at these T:S, comma-separated")
    args = parser.parse_args()
    try:
        apes = [(float(t), float(s)) for t, s in (item.split(":") for item in args.ape.split(","))] if args.ape else []
    except ValueError:
        parser.error(f"--ape {args.ape!r}: expected T:S pairs such as 0.9:0.9,1:0.9")

    loaded = kvlab.load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    tasks = make_tasks(loaded, args.task, args.n, seed=args.seed)
    sentence_ends = SentenceEnds(tokenizer)
    store = MemoryStore()
    strategies = {}
    for text in args.strategies:
        strategy = make_strategy(text.split("@")[0], float(text.split("@")[1]) if "@" in text else None)
        strategies[text] = (strategy, None)
        for temperature, scale in apes:
            strategies[f"{text} ape={temperature:g}:{scale:g}"] = (strategy, (temperature, scale))
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
        for name, (strategy, ape) in strategies.items():
            if isinstance(strategy, A3Variant):
                strategy = dataclasses.replace(strategy, ends=ends)
            if isinstance(strategy, EvidenceOracle):
                strategy = dataclasses.replace(strategy, evidence=tuple(evidence))
            routes = {}
            if ape is not None:
                route = ape_route(*ape, slice(prompt.n_prefix, prompt.n_prefix + prompt.n_docs))
                routes = {i: route for i in range(strategy.first_selective_layer(), len(decoder_layers(model)))}
            with torch.no_grad(), attention_taps(model, {}, routes):
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
                "seconds": fused.seconds,
            })
            marks.append(str(int(agree.all())))
        print(f"[{index}] {task_kind(task):8} full {'right' if full_right[-1] else 'wrong'}  same: {' '.join(marks)}",
              flush=True)
    right = [i for i, ok in enumerate(full_right) if ok]
    print(f"\n{args.model}, {args.task} seed {args.seed}: {len(tasks)} tasks, full prefill right on {len(right)} "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"{'strategy':28} {'same | full right':>24} {'same (all)':>11} {'tokens':>7} {'logprob':>8} {'evidence':>9} "
          f"{'prefill s':>10}")
    for name, got in rows.items():
        same_right = sum(got[i]["same"] for i in right)
        low, high = wilson_interval(same_right, len(right)) if right else (float("nan"), float("nan"))
        evidence = [g["evidence"] for g in got if g["evidence"] is not None]
        print(f"{name:28} {same_right:>5}/{len(right):<3} [{low:.2f}, {high:.2f}] {sum(g['same'] for g in got):>6}/"
              f"{len(got):<4} {statistics.fmean(g['tokens'] for g in got):7.3f} "
              f"{statistics.fmean(g['logprob'] for g in got):8.3f} "
              f"{statistics.fmean(evidence) if evidence else float('nan'):9.2f} "
              f"{statistics.fmean(g['seconds'] for g in got):10.2f}")


if __name__ == "__main__":
    main()
