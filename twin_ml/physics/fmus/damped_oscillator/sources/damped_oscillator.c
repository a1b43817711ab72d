/* A damped oscillator driven by a force, as an FMI 2.0 model-exchange FMU.
 *
 *   d(position)/dt = velocity
 *   d(velocity)/dt = (force - stiffness * position - damping * velocity) / mass
 *   spring_force   = stiffness * position
 *
 * Value references (modelDescription.xml): 0 position, 1 der(position), 2 velocity,
 * 3 der(velocity), 4 stiffness, 5 damping, 6 mass, 7 force, 8 spring_force.
 * twin-ml builds it with `python -m twin_ml.physics.fmu build` (gcc against FMPy's FMI headers).
 * No events, no discrete states: what model exchange with an ODE solver needs and no more.
 */
#include <stdlib.h>
#include <string.h>

#include "fmi2Functions.h"

#define GUID "{5f2c1e0a-7d4b-4c3e-9a61-2b8f0d9e4a17}"
#define N_VARS 9
#define N_STATES 2

enum { POSITION, DER_POSITION, VELOCITY, DER_VELOCITY, STIFFNESS, DAMPING, MASS, FORCE,
       SPRING_FORCE };

static const double START[N_VARS] = {0.1, 0.0, 0.0, 0.0, 4.0, 0.4, 1.0, 0.0, 0.4};

typedef struct {
    double r[N_VARS];
    double time;
    fmi2CallbackFunctions cb;
    char *name;
} Model;

static void compute(Model *m) {
    double *r = m->r;
    r[DER_POSITION] = r[VELOCITY];
    r[DER_VELOCITY] = (r[FORCE] - r[STIFFNESS] * r[POSITION] - r[DAMPING] * r[VELOCITY]) / r[MASS];
    r[SPRING_FORCE] = r[STIFFNESS] * r[POSITION];
}

static fmi2Status fail(Model *m, const char *message) {
    if (m && m->cb.logger) m->cb.logger(m->cb.componentEnvironment, m->name, fmi2Error, "error",
                                        message);
    return fmi2Error;
}

const char *fmi2GetTypesPlatform(void) { return fmi2TypesPlatform; }
const char *fmi2GetVersion(void) { return fmi2Version; }

fmi2Status fmi2SetDebugLogging(fmi2Component c, fmi2Boolean on, size_t n,
                               const fmi2String categories[]) {
    (void)c; (void)on; (void)n; (void)categories;
    return fmi2OK;
}

fmi2Component fmi2Instantiate(fmi2String name, fmi2Type type, fmi2String guid,
                              fmi2String resources, const fmi2CallbackFunctions *cb,
                              fmi2Boolean visible, fmi2Boolean logging) {
    (void)resources; (void)visible; (void)logging;
    if (type != fmi2ModelExchange || !guid || strcmp(guid, GUID) != 0) return NULL;
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    if (cb) m->cb = *cb;
    m->name = malloc(strlen(name ? name : "") + 1);
    if (m->name) strcpy(m->name, name ? name : "");
    memcpy(m->r, START, sizeof START);
    return m;
}

void fmi2FreeInstance(fmi2Component c) {
    Model *m = c;
    if (!m) return;
    free(m->name);
    free(m);
}

fmi2Status fmi2SetupExperiment(fmi2Component c, fmi2Boolean tolDefined, fmi2Real tol,
                               fmi2Real start, fmi2Boolean stopDefined, fmi2Real stop) {
    (void)tolDefined; (void)tol; (void)stopDefined; (void)stop;
    ((Model *)c)->time = start;
    return fmi2OK;
}

fmi2Status fmi2EnterInitializationMode(fmi2Component c) { (void)c; return fmi2OK; }
fmi2Status fmi2ExitInitializationMode(fmi2Component c) { compute(c); return fmi2OK; }
fmi2Status fmi2Terminate(fmi2Component c) { (void)c; return fmi2OK; }

fmi2Status fmi2Reset(fmi2Component c) {
    Model *m = c;
    memcpy(m->r, START, sizeof START);
    m->time = 0.0;
    return fmi2OK;
}

fmi2Status fmi2GetReal(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                       fmi2Real value[]) {
    Model *m = c;
    compute(m);
    for (size_t i = 0; i < n; i++) {
        if (vr[i] >= N_VARS) return fail(m, "unknown value reference");
        value[i] = m->r[vr[i]];
    }
    return fmi2OK;
}

fmi2Status fmi2SetReal(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                       const fmi2Real value[]) {
    Model *m = c;
    for (size_t i = 0; i < n; i++) {
        if (vr[i] >= N_VARS) return fail(m, "unknown value reference");
        if (vr[i] == MASS && !(value[i] > 0.0)) return fail(m, "mass must be > 0");
        m->r[vr[i]] = value[i];
    }
    return fmi2OK;
}

/* No integer, boolean or string variables. */
fmi2Status fmi2GetInteger(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                          fmi2Integer v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no integer variables") : fmi2OK;
}
fmi2Status fmi2GetBoolean(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                          fmi2Boolean v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no boolean variables") : fmi2OK;
}
fmi2Status fmi2GetString(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                         fmi2String v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no string variables") : fmi2OK;
}
fmi2Status fmi2SetInteger(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                          const fmi2Integer v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no integer variables") : fmi2OK;
}
fmi2Status fmi2SetBoolean(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                          const fmi2Boolean v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no boolean variables") : fmi2OK;
}
fmi2Status fmi2SetString(fmi2Component c, const fmi2ValueReference vr[], size_t n,
                         const fmi2String v[]) {
    (void)vr; (void)v;
    return n ? fail(c, "no string variables") : fmi2OK;
}

/* FMU state and directional derivatives are not provided (the capability flags say so). */
fmi2Status fmi2GetFMUstate(fmi2Component c, fmi2FMUstate *s) { (void)s; return fail(c, "no"); }
fmi2Status fmi2SetFMUstate(fmi2Component c, fmi2FMUstate s) { (void)s; return fail(c, "no"); }
fmi2Status fmi2FreeFMUstate(fmi2Component c, fmi2FMUstate *s) { (void)s; return fail(c, "no"); }
fmi2Status fmi2SerializedFMUstateSize(fmi2Component c, fmi2FMUstate s, size_t *n) {
    (void)s; (void)n;
    return fail(c, "no FMU state");
}
fmi2Status fmi2SerializeFMUstate(fmi2Component c, fmi2FMUstate s, fmi2Byte b[], size_t n) {
    (void)s; (void)b; (void)n;
    return fail(c, "no FMU state");
}
fmi2Status fmi2DeSerializeFMUstate(fmi2Component c, const fmi2Byte b[], size_t n,
                                   fmi2FMUstate *s) {
    (void)b; (void)n; (void)s;
    return fail(c, "no FMU state");
}
fmi2Status fmi2GetDirectionalDerivative(fmi2Component c, const fmi2ValueReference u[], size_t nu,
                                        const fmi2ValueReference k[], size_t nk,
                                        const fmi2Real dk[], fmi2Real du[]) {
    (void)u; (void)nu; (void)k; (void)nk; (void)dk; (void)du;
    return fail(c, "no directional derivatives");
}

/* Model exchange */
fmi2Status fmi2EnterEventMode(fmi2Component c) { (void)c; return fmi2OK; }

fmi2Status fmi2NewDiscreteStates(fmi2Component c, fmi2EventInfo *info) {
    (void)c;
    info->newDiscreteStatesNeeded = fmi2False;
    info->terminateSimulation = fmi2False;
    info->nominalsOfContinuousStatesChanged = fmi2False;
    info->valuesOfContinuousStatesChanged = fmi2False;
    info->nextEventTimeDefined = fmi2False;
    info->nextEventTime = 0.0;
    return fmi2OK;
}

fmi2Status fmi2EnterContinuousTimeMode(fmi2Component c) { (void)c; return fmi2OK; }

fmi2Status fmi2CompletedIntegratorStep(fmi2Component c, fmi2Boolean noSetPrior,
                                       fmi2Boolean *enterEventMode, fmi2Boolean *terminate) {
    (void)c; (void)noSetPrior;
    *enterEventMode = fmi2False;
    *terminate = fmi2False;
    return fmi2OK;
}

fmi2Status fmi2SetTime(fmi2Component c, fmi2Real time) {
    ((Model *)c)->time = time;
    return fmi2OK;
}

fmi2Status fmi2SetContinuousStates(fmi2Component c, const fmi2Real x[], size_t nx) {
    Model *m = c;
    if (nx != N_STATES) return fail(m, "expected 2 continuous states");
    m->r[POSITION] = x[0];
    m->r[VELOCITY] = x[1];
    return fmi2OK;
}

fmi2Status fmi2GetDerivatives(fmi2Component c, fmi2Real dx[], size_t nx) {
    Model *m = c;
    if (nx != N_STATES) return fail(m, "expected 2 continuous states");
    compute(m);
    dx[0] = m->r[DER_POSITION];
    dx[1] = m->r[DER_VELOCITY];
    return fmi2OK;
}

fmi2Status fmi2GetEventIndicators(fmi2Component c, fmi2Real z[], size_t nz) {
    (void)z;
    return nz ? fail(c, "no event indicators") : fmi2OK;
}

fmi2Status fmi2GetContinuousStates(fmi2Component c, fmi2Real x[], size_t nx) {
    Model *m = c;
    if (nx != N_STATES) return fail(m, "expected 2 continuous states");
    x[0] = m->r[POSITION];
    x[1] = m->r[VELOCITY];
    return fmi2OK;
}

fmi2Status fmi2GetNominalsOfContinuousStates(fmi2Component c, fmi2Real x[], size_t nx) {
    (void)c;
    for (size_t i = 0; i < nx; i++) x[i] = 1.0;
    return fmi2OK;
}
