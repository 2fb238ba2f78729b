"""lmcraft.data: the data stage, raw text -> training-ready token shards.

readers (streaming text/JSONL/JSON/CSV/Parquet, compressed) -> clean (HTML, Unicode, whitespace,
boilerplate lines) -> filters + langid (Gopher, C4, blocklist, language) and pii -> dedup (exact,
MinHash LSH; dedup_eval measures it) -> augment (EDA, back-translation) -> pack (token shards) ->
datasets (causal windows, NSP/SOP pairs). pipeline runs the steps; prepare is the executor (chunks, worker
pool, resume) that writes parts (one chunk each) and packs them; report writes the run report.
`lmcraft prepare` (lmcraft.stages.prepare) holds the config and calls prepare.
"""
