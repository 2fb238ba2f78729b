"""lmcraft.models"""
