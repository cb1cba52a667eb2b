"""The OPRD step: which layers and positions are supervised, teacher targets, losses."""
