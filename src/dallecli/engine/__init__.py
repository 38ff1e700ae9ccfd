"""The engine: device policy, safe loading, generation. It never prints, exits or imports Typer/Rich."""
