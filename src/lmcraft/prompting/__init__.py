"""lmcraft.prompting"""
