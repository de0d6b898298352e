"""Speculative decoding: cheap drafts, verified by the target model in one step.

Glossary (Leviathan, Kalman and Matias, "Fast Inference from Transformers via
Speculative Decoding", ICML 2023; Chen et al., "Accelerating Large Language Model
Decoding with Speculative Sampling", 2023):

- **draft**: a token proposed by a drafter (an n-gram lookup in the context, or a small
  draft model) that the target model has not yet checked. A sequence carries up to k
  drafts at the end of its `token_ids` between proposal and verification.
- **accepted**: a draft the target keeps. Verification accepts a prefix of the drafts.
- **recovered**: the token sampled in place of the first rejected draft, from the
  residual distribution max(0, p - q) renormalised (p target, q draft). With greedy
  decoding it is the target's argmax at that position.
- **bonus**: the extra token sampled from the target's last row when every draft was
  accepted. So one verification emits between 1 and k + 1 tokens.

The target scores all k drafts in one forward pass (they are scheduled as k extra
tokens of the sequence, and the runner returns k + 1 logits rows). The KV written for
rejected drafts is rolled back: `num_computed_tokens` returns to the accepted length and
blocks past it are freed.

Modules: `ngram.py` and `draft_model.py` propose, `rejection_sampler.py` verifies,
`stats.py` counts, `proposer.py` builds the drafter an engine configuration asks for.
"""
