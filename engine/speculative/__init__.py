"""Speculative RAST decoding (EngineConfig.speculative_tokens = γ > 0): the small models draft, the large
model verifies.

Every RAST step runs the small pair over each token anyway, so the pair can draft γ tokens ahead while it
computes its terms of the target at those positions; only the large model M is saved, one forward over
γ + 1 positions a round instead of one a token. A round over a decode batch (round.py):
1. the small models run γ + 1 decode steps: step j reads the last token (j = 0) or draft j and gives
   R's and S's logits at that position; steps j < γ draw draft j + 1 from the draft distribution q_j;
2. M runs once over the last token and the γ drafts (a prefill of γ + 1 tokens over the paged cache);
3. the target p_j = RAST's distribution (rast_probs) at each position and q_j the draft's, both with the
   request's temperature and filters; speculative sampling (accept.py) accepts draft j + 1 with
   probability min(1, p_j / q_j) until the first rejection, which is replaced by a draw from
   norm(max(0, p_j − q_j)); when all γ pass, one more token comes from p_γ. The tokens are distributed
   exactly as RAST's own sampling (Leviathan et al. 2023, Thm. 1), a round yields 1 to γ + 1 of them,
   and greedy requests get exactly the greedy tokens.
The drafts ("small": S + λ·(R − S) with the request's λ, RAST's formula with S in M's place; "rl": R
alone) cost no model beyond the triple. `rast analyze accept` measures how often they are accepted.

Randomness is counter-based as in rast_kernels.rng, keyed by the sequence's seed (salted per use) and
the position of the token drawn, so a seeded request gives the same tokens in any batch; they differ from
the tokens of the same seed without speculation (another algorithm), not in distribution.

Limits of this first version: rounds run eagerly (no CUDA graph; the engine captures none when
speculating) with async scheduling off; the small models' last step and M's verify run one after the
other (they could overlap on two streams); a round reads its tokens back once.
"""
