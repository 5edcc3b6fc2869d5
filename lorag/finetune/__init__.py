"""Fine-tuning through the OpenAI API: files, jobs run by a worker process beside serving, `ft:` models."""
