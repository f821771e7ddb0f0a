"""pip installation of affordance_core and the affordance_ros Python modules (no ROS needed).

Robots build the package with colcon (CMakeLists.txt + package.xml); this file serves training
machines, tests and replay. torch is not pinned here: robots bring their own build (e.g. Jetson
wheels). Known-good pinned versions live in requirements.txt / requirements-dev.txt.
"""
from glob import glob

from setuptools import find_packages, setup

CONSOLE_SCRIPTS = [
    'affordance-synth = affordance_core.cli.synth:main',
    'affordance-train = affordance_core.cli.train:main',
    'affordance-eval = affordance_core.cli.evaluate:main',
    'affordance-export = affordance_core.cli.export:main',
    'affordance-ground = affordance_core.cli.ground:main',
    'affordance-convert = affordance_core.cli.convert:main',
    'affordance-train-clusterer = affordance_core.cli.clusterer:main',
    'affordance-c2am = affordance_core.cli.c2am:main',
    'affordance-replay = affordance_ros.replay:main',
]

setup(
    name='affordance_ros',
    version='0.1.0',
    description='Weakly-supervised affordance grounding for robots (core + ROS 2 node)',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['affordance_core', 'affordance_core.*', 'affordance_ros',
                                    'affordance_ros.*']),
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'timm>=1.0',
        'numpy>=1.24',
        'opencv-python-headless>=4.8',
        'pillow>=10',
        'pyyaml>=6',
        'tqdm>=4.60',
    ],
    extras_require={
        'train': ['tensorboard>=2.14'],
        'export': ['onnx>=1.16', 'onnxruntime>=1.18'],
        'clip': ['open_clip_torch>=2.20', 'ftfy>=6'],
        'replay': ['rosbags>=0.11'],
        'test': ['pytest>=8', 'pytest-timeout>=2', 'catkin-pkg>=1.0', 'rosbags>=0.11',
                 'mypy>=1.10', 'onnx>=1.16', 'onnxruntime>=1.18', 'tensorboard>=2.14'],
    },
    entry_points={'console_scripts': CONSOLE_SCRIPTS},
    # the message definitions let affordance-replay write self-describing bags outside a checkout
    data_files=[('share/affordance_ros', ['package.xml']),
                ('share/affordance_ros/msg', sorted(glob('msg/*.msg'))),
                ('share/affordance_ros/launch', ['launch/grounding.launch.py']),
                ('share/affordance_ros/config', ['config/grounding.yaml',
                                                 'config/grounding.rviz'])],
    zip_safe=False,
)
