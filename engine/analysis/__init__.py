"""Why transfer works (`rast analyze`): path coverage rate (Eq. 2, pcr.py), per-token KLD of M̃ against
M_base (Sec. 4.2, kld.py) and the cosine similarity of two ΔR (Sec. 4.1, cosine.py); and whether
speculative decoding with the small models as the draft would pay (accept.py). All on teacher-forced
trajectories scored by `LLM.score`. Nothing is imported here, so registering the CLI stays free of torch."""
