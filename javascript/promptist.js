// Promptist tab, Train SFT / Train PPO / Evaluate: a task id for the webui's progress bar and live preview
// (over the curve, or the grid), as the built-in Train tab does (javascript/textualInversion.js).
function promptistStartTraining(kind, args, image) {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('promptist_' + kind + '_output'),
        gradioApp().getElementById('promptist_' + kind + '_' + (image || 'curve')), function() {}, function(progress) {
            gradioApp().getElementById('promptist_' + kind + '_progress').innerHTML = progress.textinfo || '';
        });
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function promptistStartTraining_sft() {
    return promptistStartTraining('sft', arguments);
}

function promptistStartTraining_ppo() {
    return promptistStartTraining('ppo', arguments);
}

function promptistStartTraining_tpo() {
    return promptistStartTraining('tpo', arguments);
}

function promptistStartEvaluate() {
    return promptistStartTraining('eval', arguments, 'grid');
}
