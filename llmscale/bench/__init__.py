"""`llmscale bench`: workloads, arrival processes, a streaming OpenAI load client, an in-process
runner, metrics (TTFT, TPOT, ITL, E2E, goodput) and reports with plots.

Only `config` is imported from the rest of llmscale at module level; the engine, tokenizer and
plotting libraries load inside the functions that need them."""
