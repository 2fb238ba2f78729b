"""lmcraft.objectives"""
