"""lmcraft.data"""
