"""The core every layer may use: errors, serdes, logging. Imports nothing else of ours."""
