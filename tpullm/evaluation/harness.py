"""A tpullm model for EleutherAI's LM Evaluation Harness (lm-eval 0.4): registered as "tpullm".

    import tpullm.evaluation.harness  # registers the model
    lm_eval.simple_evaluate(model="tpullm", model_args="workdir=/tmp/run", tasks=["hellaswag"])

or from the shell `python -m tpullm.eval --workdir=DIR --tasks=...` (results per checkpoint), or
`python -m tpullm.evaluation.lm_eval_cli --model tpullm --model_args workdir=DIR --tasks ...` (the harness'
own command line; lm-eval finds models only by import, so this module must be imported first).

The harness splits contexts from continuations the way it does for every causal model (trailing spaces
go to the continuation; the pair is tokenized together and the context's tokens split off), so scores
compare with its `hf` model's on the same weights and tokenizer. Scoring packs many requests into a row
(tpullm/evaluation/scoring.py); generation runs through the KV-cache Generator.
"""

from __future__ import annotations

import collections

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from tpullm.checkpoint import load_model
from tpullm.data import load_tokenizer
from tpullm.evaluation.scoring import Scorer
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256


@register_model("tpullm")
class TpullmLM(TemplateLM):
    """model_args: workdir (a training run or an export), step (default: the newest intact checkpoint),
    max_length (rows of this many tokens; default: the run's data.seq_len), batch_rows (rows per forward
    pass), generate_batch (prompts decoded together by generate_until). In Python, a loaded model, params and
    tokenizer can be given instead of workdir, and a scorer (e.g. a SharedScorer) for the log-likelihoods."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        max_length: int | None = None,
        batch_rows: int = 8,
        generate_batch: int = 16,
        model=None,
        params=None,
        tokenizer=None,
        scorer: Scorer | None = None,
        **_harness_kwargs,  # batch_size, device, ...: set by the harness for every model
    ):
        super().__init__()
        if model is None:
            model, config, params = load_model(workdir, None if step is None else int(step))
            tokenizer = load_tokenizer(config.data.tokenizer)
            max_length = max_length or config.data.seq_len
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_length = int(max_length or model.config.max_length)
        self.scorer = scorer or Scorer(model, params, self.max_length, int(batch_rows))
        self.generate_batch = int(generate_batch)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = self.scorer.score([(context, continuation) for _, context, continuation in requests])
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents = [self.tok_encode(string) for (string,) in (r.args for r in requests)]
        return self.scorer.rolling(documents, self.prefix_token_id)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and a temperature) continuations, cut before the first of the
        request's `until` strings; requests sharing generation settings decode together."""
        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups[repr(sorted(gen_kwargs.items()))].append((i, context, gen_kwargs))
        outputs = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            gen_kwargs = members[0][2]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            generator = Generator(self.model, self.params, max_length=self.max_length)
            for start in range(0, len(members), self.generate_batch):
                chunk = members[start : start + self.generate_batch]
                # the context keeps its last tokens so that the continuation fits
                prompts = [
                    self.tok_encode(c)[-(self.max_length - max_new) :] or [self.prefix_token_id] for _, c, _ in chunk
                ]
                completions = generator.generate(
                    prompts, max_new, SamplingParams(temperature=temperature), eos_id=self.eot_token_id
                )
                for (i, _, _), completion in zip(chunk, completions):
                    text = self.tokenizer.decode(completion.tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[i] = text
                progress.update(len(chunk))
        progress.close()
        return outputs
