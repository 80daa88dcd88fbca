"""Operations on the node's state that the CLI, the HTTP API and the console share: remote nodes
(validation, C-ECHO), study summaries, resend and reanalysis. They take plain values and return
plain results; printing and HTTP belong to their callers."""
