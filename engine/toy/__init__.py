"""The miniature RAST world: 5-digit addition with a rare, accurate carry-by-carry path; a character
tokenizer; Qwen2 models trained by ``python -m rast_engine.toy.train`` and shipped under assets/toy."""
