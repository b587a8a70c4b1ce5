"""Speculative RAST decoding (EngineConfig.speculative_tokens = γ > 0): the small models draft, the large
model verifies.

Every RAST step runs the small pair over each token anyway, so the pair can draft γ tokens ahead while it
computes its terms of the target at those positions; only the large model M is saved, one forward over
γ + 1 positions a round instead of one a token. A round over a decode batch (round.py):
1. the small models run γ + 1 decode steps: step j reads the last token (j = 0) or draft j and gives
   R's and S's logits at that position; steps j < γ draw draft j + 1 from the draft distribution q_j;
2. M runs once over the last token and the γ drafts (a prefill of γ + 1 tokens over the paged cache);
3. the target p_j = RAST's distribution at each position, with the request's temperature and filters,
   decides which drafts stand, by one of two methods:
   - "coupled" (the default): the draft of position j is drawn with the noise the plain sampler would
     use there (the sequence's seed, offset + j), and so is the target's own token at every position;
     a draft passes iff it is the target's token, and the first that is not is replaced by it. The
     tokens are then exactly the plain sampler's for that seed, whatever the rounds: turning
     speculation on, the batch around a request, preemptions or the context's end change nothing but
     speed (drafter-invariant speculative decoding, Daliri et al. 2024). "Exactly" holds for the same
     logits: M's verify is a multi-token prefill over the cache, plain decoding a decode step, and in
     bf16 on a GPU their rounding may differ enough to flip a near-tie. A draft passes with probability
     P(argmax(log q + g) = argmax(log p + g)) (shared Gumbel noise g), at least (1 − TV) / (1 + TV)
     with TV the total variation between p and q;
   - "rejection": speculative sampling (accept.py; Leviathan et al. 2023, Thm. 1): draft j passes with
     probability min(1, p_j / q_j), the first rejected one is replaced by a draw from
     norm(max(0, p_j − q_j)). The optimal coupling: a draft passes with probability Σ min(p, q) = 1 − TV,
     and the tokens follow RAST's distribution exactly, but a seeded request's tokens depend on where
     its rounds start and end (so on its batch: a neighbour near the context's end shortens rounds).
   Either way a round yields 1 to γ + 1 tokens and greedy requests get exactly the greedy tokens.
The drafts ("small": S + λ·(R − S) with the request's λ, RAST's formula with S in M's place; "rl": R
alone) cost no model beyond the triple. `rast analyze accept` measures how often they are accepted.

Logit adjustments (logit_bias, allowed_token_ids, bad words, min_tokens, penalties) apply at every
position of a round, to the target and the drafts, as plain decoding would apply them had the drafts
before it been accepted (adjust.py), so the coupled method's tokens stay the plain ones; such a round runs
eagerly. Structured outputs too: a fork of the sequence's grammar matcher walks the drafts on the host,
each copied back as it is drawn (grammar.py).

Randomness is counter-based as in rast_kernels.rng, keyed by the sequence's seed (salted per use by the
rejection method) and the position of the token drawn, never by the batch.

On CUDA (without enforce_eager) a round of the full γ is one CUDA graph per batch bucket up to
ROUND_GRAPH_ROWS rows (ModelRunner.round_graphs, captured at start like the decode graphs, which a
speculating engine does not capture); a round shrunk near the context's end, a larger batch and the
plain decode steps of a speculating engine (first draws) run eagerly. The small pair's last step, which
draws no draft, runs beside M's verify on the side stream. Limits: async scheduling is off (a round's
length must reach the host before the next round is scheduled), and a round reads its tokens back once.
"""
