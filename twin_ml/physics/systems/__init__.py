"""The shipped physics systems; importing this package registers them."""

from twin_ml.physics.systems.cascaded_tanks import CascadedTanks as CascadedTanks
from twin_ml.physics.systems.cstr import CSTR as CSTR
from twin_ml.physics.systems.duffing import Duffing as Duffing
from twin_ml.physics.systems.heat_plate import HeatPlate as HeatPlate
from twin_ml.physics.systems.pendulum import Pendulum as Pendulum
from twin_ml.physics.systems.robertson import Robertson as Robertson
from twin_ml.physics.systems.thermal import ThermalRC as ThermalRC
from twin_ml.physics.systems.tubular_reactor import TubularReactor as TubularReactor
