"""lmcraft.train"""
