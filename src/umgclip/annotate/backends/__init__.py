"""umgclip subpackage."""
